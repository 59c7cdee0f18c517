"""A web demo of a trained model: ask about an image (or, for a text-only model, just ask), see the answer, the
decoded thoughts and where each looked.

    pip install -e ".[app]"
    python -m multimodal_coconut.app runs/demo [--port 7860] [--host 127.0.0.1]

MODEL is a run directory (its newest checkpoint), a checkpoint directory or an exported HF folder. The page serves
on localhost unless --host says otherwise. Answers come from `inference.answer_question` (the prompt, generation
and answer mapping of training's evaluation); the heatmap is `inference.thought_attention` of the chosen thought
over the image tokens, averaged over layers or of one layer, laid out on InternVL's tile grid. For a text-only model
(a causal LM trained on the original Coconut's format or jsonl) the page has no image input and no heatmap, and a
model trained on the original Coconut's format (no choices) no choices box. A bad question or image is shown on the
page; the server keeps serving. The same answering is an HTTP API (`/ask`, the same inputs for every model: the
image is None for a text-only one) for `gradio_client`.
"""

from __future__ import annotations

import argparse
import html
import sys
from pathlib import Path

from PIL import Image

from .data import DataError, load_samples
from .inference import (InputError, LoadError, Trained, answer_question, default_device, image_attention_map,
                        load_trained, needs_image, overlay_heatmap, question_sample, thought_attention)

MEAN = "mean over layers"
DISPLAY_PX = 320


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m multimodal_coconut.app", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="run directory, checkpoint_N directory or exported HF folder")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="interface to serve on (0.0.0.0: every interface)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    return p


def example_questions(trained: Trained, n: int = 4) -> list[list]:
    """[image, question, choices] ([question, choices] for a text-only model) of the first questions of the run's
    validation split, when its files are here."""
    cfg = trained.config
    try:
        samples = load_samples(cfg.dataset, cfg.val_path, image_root=cfg.image_root, max_samples=n) \
            if cfg.val_path else []
    except (DataError, ValueError, OSError):
        return []
    if not trained.backbone.is_multimodal:
        return [[s.question, ", ".join(s.choices)] for s in samples if s.image is None]
    return [[s.image, s.question, ", ".join(s.choices)] for s in samples
            if isinstance(s.image, str) and Path(s.image).is_file()]


def thoughts_html(thoughts: list[list[str]]) -> str:
    if not thoughts:
        return "<p>No continuous thoughts at this stage.</p>"
    items = "".join(f"<li>thought {i}: " + " ".join(f"<code>{html.escape(repr(t))}</code>" for t in tokens) + "</li>"
                    for i, tokens in enumerate(thoughts, 1))
    return f'<ol class="thoughts">{items}</ol>'


def heatmap(backbone, state: dict | None, thought: str | None, layer: str | None):
    """The image with the chosen thought's attention over it (None when there is nothing to draw)."""
    if not state or not state["attention"].shape[0] or not thought:
        return None
    weights = state["attention"][int(thought) - 1]  # (layers, T)
    weights = weights.mean(0) if layer in (None, MEAN) else weights[int(layer.split()[-1])]
    with Image.open(state["image"]) as img:
        image = img.convert("RGB")
    heat = image_attention_map(weights, state["input_ids"], backbone, *image.size)
    if max(image.size) < DISPLAY_PX:  # small images (the tiny model's 64 px) are enlarged to be seen
        scale = DISPLAY_PX / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    return overlay_heatmap(image, heat)


def build(trained: Trained):
    """The Gradio Blocks of the demo over a loaded model."""
    import gradio as gr

    n_layers = trained.model.decoder.config.num_hidden_layers
    mode = trained.mode
    max_stage = 0 if (mode.cot or mode.no_cot) else max(trained.stage, mode.max_latent_stage)
    multimodal = trained.backbone.is_multimodal  # a text-only model: no image input, no heatmap
    has_choices = trained.config.dataset != "coconut"  # the original Coconut's questions have none

    def ask(image, question, choices, stage, layer):
        """(answer, thoughts, heatmap, message, thought selector, state)."""
        try:
            if not image and needs_image(trained):
                raise InputError("no image: upload one or pick an example")
            sample = question_sample(image or None, question or "",
                                     [c for c in (choices or "").split(",") if c.strip()])
            answered = answer_question(trained, sample, stage=int(stage))
        except (InputError, DataError) as e:
            return "", "", None, f"**error:** {html.escape(str(e))}", gr.update(choices=[], value=None), None
        state = None
        if image:  # where each thought looked in it
            attention = thought_attention(trained.model, answered.batch)[0].cpu()  # (n_thoughts, layers, T)
            state = {"attention": attention, "input_ids": answered.batch["input_ids"][0].cpu(), "image": image}
        labels = [str(i) for i in range(1, len(answered.thoughts) + 1)]
        first = labels[0] if labels else None
        message = f"{len(answered.thoughts)} continuous thought(s), stage {answered.stage}; generated " \
                  f"`{answered.generated!r}`"
        return (answered.answer, thoughts_html(answered.thoughts), heatmap(trained.backbone, state, first, layer),
                message, gr.update(choices=labels, value=first), state)

    with gr.Blocks(title="Multimodal CoCoNuT", analytics_enabled=False) as demo:
        what = "Ask about an image" if multimodal else f"Ask a question (a text-only model, {trained.config.model_id})"
        gr.Markdown(f"# Multimodal CoCoNuT\n{what}; the model reasons in continuous thoughts before it "
                    f"answers. Model: `{trained.path}` (trained to stage {trained.stage}).")
        state = gr.State(None)
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="image", sources=["upload"], elem_id="image",
                                 height=DISPLAY_PX, visible=multimodal)
                question = gr.Textbox(label="question", elem_id="question")
                choices = gr.Textbox(label="choices (comma-separated, optional)", elem_id="choices",
                                     visible=has_choices)
                stage = gr.Slider(0, max_stage, value=min(trained.stage, max_stage), step=1,
                                  label="reasoning steps as continuous thoughts (stage)", elem_id="stage")
                button = gr.Button("Ask", variant="primary", elem_id="ask")
                examples = example_questions(trained)
                if examples:
                    gr.Examples(examples, [image, question, choices] if multimodal else [question, choices],
                                label="examples from the validation split")
            with gr.Column():
                answer = gr.Textbox(label="answer", elem_id="answer", interactive=False)
                message = gr.Markdown(elem_id="message")
                thoughts = gr.HTML(label="decoded thoughts (top tokens of each)", elem_id="thoughts")
                with gr.Row(visible=multimodal):
                    thought = gr.Dropdown([], label="thought", elem_id="thought")
                    layer = gr.Dropdown([MEAN] + [f"layer {i}" for i in range(n_layers)], value=MEAN,
                                        label="attention of", elem_id="layer")
                heat = gr.Image(type="pil", label="where the chosen thought looked", elem_id="heatmap",
                                interactive=False, height=DISPLAY_PX, visible=multimodal)
        button.click(ask, [image, question, choices, stage, layer], [answer, thoughts, heat, message, thought, state],
                     api_name="ask")
        for control in (thought, layer):
            control.change(lambda *a: heatmap(trained.backbone, *a), [state, thought, layer], heat, api_name=False)
    return demo


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        import gradio  # noqa: F401  (an optional extra: say how to install it rather than fail on import)
    except ImportError:
        print('error: the web demo needs gradio: pip install -e ".[app]"', file=sys.stderr)
        return 2
    try:
        trained = load_trained(args.model, device=args.device or default_device())
    except LoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve(build(trained), args.host, args.port)
    return 0


def serve(demo, host: str, port: int, **launch):
    """Start the demo's server: no server-side rendering (it needs Node) and the system's fonts (the default theme
    downloads Google fonts, which an offline machine cannot)."""
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    return demo.launch(server_name=host, server_port=port, ssr_mode=False, theme=theme, **launch)


if __name__ == "__main__":
    sys.exit(main())
