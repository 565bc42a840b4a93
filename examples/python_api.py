"""Generate from text and an image with the Python API (no server).

    python examples/python_api.py [--model-path DIR] [--image PATH]

Without --model-path it uses the tiny seeded checkpoint (random weights, so the
text is gibberish; the point is the plumbing). First run compiles the graphs.
"""

from __future__ import annotations

import argparse

from PIL import Image

from qwen3vl_moe.api import Qwen3VL
from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--devices", default="cpu")
    parser.add_argument("--image", default=None, help="an image file (default: a generated gradient)")
    args = parser.parse_args()

    llm = Qwen3VL(args.model_path or tiny_checkpoint("moe"), devices=args.devices, max_length=2048)
    picture = args.image or Image.linear_gradient("L").resize((320, 200)).convert("RGB")
    conversations = [
        [{"role": "user", "content": "Write one sentence about the sea."}],
        [{"role": "user", "content": [
            {"type": "image", "image": picture},
            {"type": "text", "text": "What is in this image?"},
        ]}],
    ]
    for conversation, out in zip(conversations, llm.generate(conversations, max_new_tokens=24)):
        print(f"{conversation[0]['content'] if isinstance(conversation[0]['content'], str) else '[image] question'}")
        print(f"  -> {out.text!r} ({len(out.token_ids)} tokens)")


if __name__ == "__main__":
    main()
