"""User-facing errors. The CLI prints their message as one line, without a traceback."""


class QavatarError(Exception):
    """An error whose message tells the user what went wrong and what to do."""


class ConfigError(QavatarError):
    pass


class CheckpointError(QavatarError):
    pass


class LoraError(CheckpointError):
    pass


class CalibrationError(QavatarError):
    pass
