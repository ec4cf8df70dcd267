"""`cmrp demo RUN_OR_CHARACTER_DIR`: a Gradio chat page with a character, images shown inline.

Gradio is the optional `demo` extra and is imported only here, inside the functions. The page is served on
127.0.0.1 unless `--host` says otherwise; a public share link is made only with `--share`. Each browser tab
has its own conversation (a `ChatSession` on the one loaded backbone); requests are answered one at a time.
"""

from __future__ import annotations

import argparse
import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmrp.chat.commands import add_session_arguments
from cmrp.chat.session import ChatSession
from cmrp.errors import CmrpError, ConfigError

if TYPE_CHECKING:  # Gradio itself is imported on use (`_import_gradio`); the handlers get the class itself below
    from gradio import Request as GradioRequest

    from cmrp.backbones.protocol import Backbone

__all__ = ["build_demo", "register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="a local web chat page with a customized character (Gradio; pip install 'cmrp[demo]')",
        description="Serve a Gradio chat page for the character of a `cmrp fit` run (output_dir or its "
        "checkpoint/) or of a character artefact (`cmrp save-character`). Tick 'with image' to have the "
        "character also draw an image, shown inline and saved as PNG under --out. Bound to 127.0.0.1 unless "
        "--host says otherwise; no public link unless --share.",
    )
    p.add_argument("source", metavar="RUN_OR_CHARACTER_DIR", help="a `cmrp fit` output_dir, or a character artefact")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860,
                   help="port (default 7860); 0: the first free one from 7860, printed once the page is served")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    p.add_argument("--out", type=Path, default=Path("chat"), help="folder for the images (default ./chat)")
    add_session_arguments(p)
    p.set_defaults(handler=_demo)


def _import_gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise CmrpError("`cmrp demo` needs Gradio: pip install 'cmrp[demo]'") from None
    return gradio


def _view_copy(path: Path, min_side: int = 256) -> Path:
    """An enlarged copy (nearest neighbour) beside the sample, for the page: a 32 px image shown at its own
    size is a speck. The sample itself stays as drawn."""
    from PIL import Image

    from cmrp.evaluation.report import upscaled

    view = path.with_name(f"{path.stem}-view.png")
    with Image.open(path) as image:
        upscaled(image.convert("RGB"), min_side).save(view)
    return view


def build_demo(backbone: Backbone, info: Any, *, out_dir: str | Path = "chat", **session_kwargs: Any) -> Any:
    """The Gradio Blocks app: a chatbot, a message box, a 'with image' checkbox, Send and Reset buttons.

    `session_kwargs` go to every `ChatSession` (decoding, image_steps, seed, max_new_tokens, temperature).
    """
    gr = _import_gradio()

    sessions: dict[str, ChatSession] = {}

    def session_for(request: Any) -> ChatSession:
        key = str(getattr(request, "session_hash", None) or "default")
        if key not in sessions:
            sessions[key] = ChatSession(backbone, info, out_dir=out_dir, **session_kwargs)
        return sessions[key]

    def send(message: str, with_image: bool, history: list | None, request: GradioRequest):
        message = (message or "").strip()
        history = list(history or [])
        if not message:
            return "", history
        reply = session_for(request).reply(message, image=bool(with_image))
        history.append({"role": "user", "content": message})
        history.append({"role": "assistant", "content": reply.text})
        if reply.image_path is not None:
            history.append({"role": "assistant", "content": {"path": str(_view_copy(reply.image_path))}})
        return "", history

    def reset(request: GradioRequest):
        session_for(request).reset()
        return "", []

    for fn in (send, reset):  # real classes: with postponed annotations Gradio would see a string
        fn.__annotations__["request"] = gr.Request

    chatbot_kwargs: dict[str, Any] = {"label": info.name, "height": 520}
    if "type" in inspect.signature(gr.Chatbot.__init__).parameters:  # Gradio 4/5; 6 only has messages
        chatbot_kwargs["type"] = "messages"
    with gr.Blocks(title=f"cmrp: {info.name}", analytics_enabled=False) as app:
        gr.Markdown(f"## Chat with {info.name}")
        if info.profile:
            gr.Markdown(info.profile)
        chatbot = gr.Chatbot(elem_id="cmrp-chat", **chatbot_kwargs)
        with gr.Row():
            box = gr.Textbox(placeholder=f"Say something to {info.name}", show_label=False, scale=4,
                             elem_id="cmrp-message")
            with_image = gr.Checkbox(label="with image", value=False, elem_id="cmrp-with-image")
        with gr.Row():
            send_button = gr.Button("Send", variant="primary", elem_id="cmrp-send")
            reset_button = gr.Button("Reset", elem_id="cmrp-reset")
        send_button.click(send, [box, with_image, chatbot], [box, chatbot], concurrency_limit=1)
        box.submit(send, [box, with_image, chatbot], [box, chatbot], concurrency_limit=1)
        reset_button.click(reset, None, [box, chatbot], concurrency_limit=1)
    return app


def _demo(args: argparse.Namespace) -> int:
    if args.steps < 1 or args.max_new_tokens < 1:
        raise ConfigError("--steps and --max-new-tokens must be at least 1")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a port number (0-65535)")
    if not Path(args.source).expanduser().exists():
        raise ConfigError(f"{args.source} does not exist; pass a `cmrp fit` output_dir or a character artefact")
    _import_gradio()  # fail before loading the model
    from cmrp.chat.artefact import load_chat_source

    backbone, info = load_chat_source(args.source, args.base)
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    app = build_demo(backbone, info, out_dir=out, decoding=args.decoding or info.decoding, image_steps=args.steps,
                     seed=args.seed, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    # Gradio binds the port itself (port 0: it tries 7860 upwards and keeps the first it can bind), so the
    # address is printed once the server listens: scripts and tests read the port from this line
    app.queue().launch(server_name=args.host, server_port=args.port or None, share=args.share,
                       allowed_paths=[str(out)], inbrowser=False, show_error=True, prevent_thread_lock=True)
    print(f"serving a chat with {info.name} on http://{args.host}:{app.server_port} (Ctrl-C ends)", flush=True)
    app.block_thread()
    return 0
