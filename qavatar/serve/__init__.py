"""`qavatar serve`: a Gradio app that streams the avatar while it is generated (docs/serve.md).

    worker.py    the rank group: ranks start and load once, then loop on jobs (cancel at block boundaries)
    segments.py  one decoded block + its audio -> a short MPEG-TS segment for the streaming player
    uploads.py   uploaded media: size limit, type checked by content, copied into the server's temp dir
    app.py       the page and the `generate` API
Gradio is an optional extra (`pip install qavatar[serve]`); nothing here is imported by the core.
"""
