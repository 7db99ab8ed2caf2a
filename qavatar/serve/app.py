"""The page and the API of `qavatar serve`.

One rank group (worker.py) serves every visitor; Gradio's queue runs one generation at a time on it (every
generating event shares one concurrency slot) and shows each waiting visitor their position. A job streams:
each decoded block becomes an MPEG-TS segment (segments.py) yielded to a streaming gr.Video, which Gradio turns
into an HLS playlist that the page's <video> plays while the next blocks are generated. When the job is done,
the complete mp4 (the one `infer` writes, with the speech muxed in) is offered for download.

Files: everything the server writes lives in one temp dir of its own (Gradio's uploads and cache included,
via GRADIO_TEMP_DIR), each job in a dir of its own, swept after JOB_TTL_S and removed when the server stops.
"""

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

from ..errors import QavatarError

JOB_TTL_S = 3600.0  # a finished job's files (segments, mp4, uploads) are kept this long for the download
KV_DTYPES = ("bf16", "fp8", "int8")


def _examples():
    import json

    from ..demo import BUNDLED

    pairs = json.loads((BUNDLED / "manifest.json").read_text())["pairs"]
    return [[str(BUNDLED / p["image"]), str(BUNDLED / p["audio"]), p["prompt"]] for p in pairs[:4]]


class Server:
    """The server's state: its rank group, temp dir, which session is generating, queued cancels."""

    def __init__(self, group, base_request, root: Path, max_upload_mb: float):
        self.group, self.base, self.root, self.max_upload_mb = group, base_request, root, max_upload_mb
        self.jobs_dir = root / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.running_session: Optional[str] = None
        self.pending: set[str] = set()  # sessions that clicked Generate and wait in the queue
        self.cancelled: set[str] = set()  # sessions that cancelled while queued
        self.session_dirs: dict[str, list[Path]] = {}  # removed when the session's page goes away
        self._lock = threading.Lock()
        self._n = 0

    def new_job_dir(self, session: str) -> Path:
        from .uploads import sweep

        sweep(self.jobs_dir, JOB_TTL_S)
        with self._lock:
            self._n += 1
            n = self._n
        d = Path(tempfile.mkdtemp(prefix=f"job{n:04d}-", dir=self.jobs_dir))
        self.session_dirs.setdefault(session, []).append(d)
        return d

    def forget(self, session: str) -> None:
        """The session's page closed: remove its jobs' files (a running job's dir goes with the next sweep)."""
        if self.running_session == session:
            self.group.cancel()  # nobody is watching it
        for d in self.session_dirs.pop(session, []):
            if self.running_session != session:
                shutil.rmtree(d, ignore_errors=True)

    def prepare_job(self, session, image, audio, prompt, steps, seed, size, clips, kv_dtype):
        """(job dir, Prepared): uploads accepted and every cheap check of `infer` run. Raises QavatarError."""
        from ..errors import ConfigError
        from ..pipeline.infer import prepare
        from .uploads import accept, user_message
        from .worker import job_request

        d = self.new_job_dir(session)
        img = accept(image, "image", d, self.max_upload_mb)
        aud = accept(audio, "audio", d, self.max_upload_mb)
        if kv_dtype not in KV_DTYPES:
            raise ConfigError(f"KV dtype {kv_dtype}: choose {', '.join(KV_DTYPES)}")
        req = job_request(self.base, image=str(img), audio=str(aud), prompt=(prompt or "").strip() or self.base.prompt,
                          out=str(d / "avatar.mp4"), sample_steps=int(steps), seed=int(seed),
                          size=(size or "").strip() or None, num_clip=int(clips) if clips else None,
                          kv_dtype=kv_dtype, overwrite=True, quiet=True)
        try:
            prep = prepare(req)
        except QavatarError as e:
            msg = user_message(user_message(e, img, Path(image).name), aud, Path(audio).name)
            raise type(e)(msg) from None
        return d, prep

    def run(self, session: str, image, audio, prompt, steps, seed, size, clips, kv_dtype, stream: bool = True):
        """Yields (segment path or None, status markdown, mp4 path or None) as the job goes; stream=False (the
        API) writes no segments."""
        from ..pipeline.clips import DROP_FRAMES
        from ..pipeline.media import load_audio
        from .segments import write_segment
        from .worker import GroupDead

        self.pending.discard(session)
        if session in self.cancelled:
            self.cancelled.discard(session)
            yield None, "cancelled while queued", None
            return
        if self.group.dead:
            raise GroupDead(self.group.dead)
        d, prep = self.prepare_job(session, image, audio, prompt, steps, seed, size, clips, kv_dtype)
        fps = prep.cfg.sample_fps
        wave = load_audio(prep.request.audio) if stream else None
        per_clip = prep.cfg.clip_latent_frames // prep.cfg.num_frames_per_block
        t0 = last = time.perf_counter()
        first_segment_s = None
        block = frames = 0
        self.running_session = session
        try:
            yield None, f"encoding the inputs ({prep.blocks} blocks in {prep.clips} clips, {prep.height}x{prep.width})", None
            for kind, payload in self.group.run(prep):
                if kind == "frames":
                    now = time.perf_counter()
                    seg = write_segment(d / f"seg{block:04d}.ts", payload, fps, wave, frames, DROP_FRAMES / fps) \
                        if stream else None
                    if first_segment_s is None:
                        first_segment_s = time.perf_counter() - t0
                    block, frames = block + 1, frames + payload.shape[0]
                    status = (f"generating: block {block}/{prep.blocks}, clip {(block - 1) // per_clip + 1}/"
                              f"{prep.clips}, {frames}/{prep.frames} frames; last block {now - last:.1f} s; first "
                              f"segment after {first_segment_s:.1f} s")
                    last = now
                    yield (str(seg) if seg else None), status, None
                elif kind == "done":
                    yield None, (f"done: {payload['frames']} frames in {payload['seconds']:.1f} s, {block} blocks "
                                 f"streamed; first segment after {first_segment_s:.1f} s"), payload["out"]
                elif kind == "cancelled":
                    yield None, payload, None
                elif kind == "error":
                    raise QavatarError(payload)
        finally:
            self.running_session = None

    def cancel(self, session: str) -> str:
        if self.running_session == session:
            self.group.cancel()
            return "cancelling at the next block boundary"
        if session in self.pending:
            self.cancelled.add(session)
            return "cancelled while queued"
        return "nothing to cancel"


def build_app(server: Server):
    import gradio as gr

    base = server.base
    cfg = server.group.prep.cfg
    default_size = f"{cfg.default_size[0]}*{cfg.default_size[1]}"

    def stream(image, audio, prompt, steps, seed, size, clips, kv_dtype, request: gr.Request):
        session = request.session_hash if request is not None else "api"
        try:
            for seg, status, mp4 in server.run(session, image, audio, prompt, steps, seed, size, clips, kv_dtype):
                yield seg, status, mp4
        except QavatarError as e:
            yield None, f"error: {e}", None

    def api_generate(image, audio, prompt, request: gr.Request):
        out = None
        try:
            for _, _, mp4 in server.run("api:" + (request.session_hash if request else ""), image, audio, prompt,
                                        base.sample_steps, base.seed, None, base.num_clip, base.kv_dtype, stream=False):
                out = mp4 or out
        except QavatarError as e:
            raise gr.Error(str(e), print_exception=False) from None
        if out is None:
            raise gr.Error("the generation was cancelled", print_exception=False)
        return out

    def pending(request: gr.Request):
        server.pending.add(request.session_hash)

    def forget(request: gr.Request):
        if request is not None:
            server.forget(request.session_hash)

    def cancel(request: gr.Request):
        return server.cancel(request.session_hash)

    with gr.Blocks(title="qavatar serve", delete_cache=(600, int(JOB_TTL_S))) as app:
        gr.Markdown(f"## qavatar: a talking avatar, streamed while it is generated\n"
                    f"`{server.group.prep.parts.dit}` · {server.group.prep.runtime_quant or server.group.prep.parts.precision}"
                    f" · TP={server.group.prep.request.tp} on {server.group.prep.device}")
        with gr.Row():
            with gr.Column():
                image = gr.File(label="Portrait image", file_types=["image"], elem_id="image")
                audio = gr.File(label="Speech audio", file_types=["audio"], elem_id="audio")
                prompt = gr.Textbox(label="Prompt", value=base.prompt, elem_id="prompt")
                with gr.Accordion("Advanced settings", open=False):
                    steps = gr.Number(label="Steps per block", value=base.sample_steps, precision=0, minimum=1)
                    seed = gr.Number(label="Seed", value=base.seed, precision=0)
                    size = gr.Textbox(label="Size (area H*W)", value=default_size)
                    clips = gr.Number(label="Clips (0: what the audio covers)", value=base.num_clip or 0,
                                      precision=0, minimum=0, elem_id="clips")
                    kv = gr.Dropdown(list(KV_DTYPES), value=base.kv_dtype, label="KV cache dtype")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Cancel", elem_id="cancel")
            with gr.Column():
                video = gr.Video(label="Avatar (streamed)", streaming=True, autoplay=True, height=420,
                                 elem_id="stream")
                status = gr.Markdown("idle", elem_id="status")
                download = gr.File(label="Download mp4", elem_id="download")
        gr.Examples(_examples(), inputs=[image, audio, prompt])
        # marked at the click, before the queue, so that Cancel knows this session has a job waiting
        go.click(pending, None, None, queue=False, api_visibility="private").then(
            stream, [image, audio, prompt, steps, seed, size, clips, kv], [video, status, download],
            api_name="stream", concurrency_id="rank-group", concurrency_limit=1)
        stop.click(cancel, None, status, queue=False)
        app.unload(forget)
        api_in = gr.Button(visible=False)
        api_out = gr.File(visible=False)
        api_in.click(api_generate, [image, audio, prompt], api_out, api_name="generate", concurrency_id="rank-group",
                     concurrency_limit=1)
    return app


def serve(req, host: str = "127.0.0.1", port: int = 7860, max_upload_mb: float = 50.0,
          say=print) -> None:
    """Start the ranks (load once), then serve the page until interrupted. req: the InferRequest that fixes the
    checkpoint, precision, layout and defaults (its image/audio: a bundled pair, for the load checks)."""
    from ..errors import ConfigError
    from ..pipeline.infer import prepare
    from .worker import RankGroup

    missing = [b for b in ("ffmpeg", "ffprobe") if shutil.which(b) is None]
    if missing:
        raise ConfigError(f"qavatar serve streams through Gradio's video output, which needs the {' and '.join(missing)} "
                          f"binary: install ffmpeg (apt-get install ffmpeg)")
    from ..leftovers import install_terminate_handler

    restore = install_terminate_handler()  # SIGTERM: the finally below stops the ranks and removes the temp dir
    root = Path(tempfile.mkdtemp(prefix="qavatar-serve-"))
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")  # Gradio's uploads and cache stay in our dir
    group = None
    try:
        import dataclasses

        prep = prepare(dataclasses.replace(req, out=str(root / "load-check.mp4"), overwrite=True))
        say(f"qavatar serve: starting {prep.world} rank(s) on {prep.device}, loading {prep.parts.dit}")
        t = time.perf_counter()
        group = RankGroup(prep).start()
        say(f"qavatar serve: ranks ready in {time.perf_counter() - t:.1f} s (load {group.load_info['load_seconds']:.1f} s)")
        server = Server(group, req, root, max_upload_mb)
        app = build_app(server)
        app.queue(default_concurrency_limit=1)
        from ..demo import BUNDLED

        app.launch(server_name=host, server_port=port, allowed_paths=[str(BUNDLED)], max_file_size=f"{max_upload_mb:g}mb",
                   prevent_thread_lock=True, quiet=True, show_error=True)
        restore_gradio = install_terminate_handler()  # launch() put its own handler on SIGTERM
        say(f"qavatar serve: http://{host}:{port} ready")
        try:
            while not group.dead:
                time.sleep(0.5)
            say(f"qavatar serve: {group.dead}")
            while True:  # keep the page up to say so; the operator restarts the server
                time.sleep(3600)
        finally:
            restore_gradio()
            app.close()
    finally:
        if group is not None:
            group.close()
        shutil.rmtree(root, ignore_errors=True)
        restore()
