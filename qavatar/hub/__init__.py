"""Publishing checkpoints to the Hugging Face Hub (push, with a generated model card) and pulling them."""
from .pull import looks_like_repo, resolve_checkpoint
from .push import PushError, push, validate_for_upload

__all__ = ["looks_like_repo", "resolve_checkpoint", "PushError", "push", "validate_for_upload"]
