"""Send an image to a running server with the openai package.

    qwen3vl-moe serve &                       # CPU, tiny default model, 127.0.0.1:8000
    python examples/openai_client.py [--image PATH] [--base-url http://127.0.0.1:8000/v1]
"""

from __future__ import annotations

import argparse
import base64
import io

from openai import OpenAI
from PIL import Image


def data_url(path: str | None) -> str:
    if path:
        with open(path, "rb") as f:
            raw = f.read()
    else:
        buffer = io.BytesIO()
        Image.linear_gradient("L").resize((320, 200)).convert("RGB").save(buffer, format="PNG")
        raw = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--image", default=None)
    args = parser.parse_args()

    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(args.image)}},
            {"type": "text", "text": "Describe this image."},
        ]}],
        max_tokens=32,
        temperature=0,
    )
    print(response.choices[0].message.content)


if __name__ == "__main__":
    main()
