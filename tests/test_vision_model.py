"""Images end to end on CPU float32 against transformers: pixels, vision encoder, logits, greedy.

transformers is run with its PIL-backend image processor, which this package
reproduces bit for bit; the default torchvision backend resizes differently by
up to 2/255 per pixel (a different bicubic implementation), see docs/STATUS.md.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from media import ONE_IMAGE, TWO_IMAGES, conversation, image, make_video
from qwen3vl_moe.checkpoints.tiny import tiny_checkpoint

pytestmark = pytest.mark.slow  # every test here runs compiled graphs

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def checkpoint():
    return tiny_checkpoint("moe")


@pytest.fixture(scope="module")
def reference(checkpoint):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_processor(checkpoint):
    from transformers import AutoProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.image_processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)
    return processor


@pytest.fixture(scope="module")
def engine(load_engine, checkpoint):
    return load_engine(checkpoint)


def hf_inputs(processor, conv) -> dict:
    images = [p["image"] for m in conv for p in m["content"] if p.get("type") == "image"]
    chat = [{**m, "content": [{"type": p["type"]} if p["type"] == "image" else p for p in m["content"]]} for m in conv]
    text = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return dict(processor(text=[text], images=images, return_tensors="pt"))


def hf_logits(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**inputs).logits[0].float().numpy()


def hf_greedy(model, inputs: dict, steps: int) -> list[int]:
    """Greedy decoding by full recomputation with the media inputs: no cache, no generate() policies."""
    seq, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    tokens = []
    for _ in range(steps):
        step = {**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq), "mm_token_type_ids": types}
        tokens.append(int(hf_logits(model, step)[-1].argmax()))
        seq = torch.cat([seq, torch.tensor([[tokens[-1]]])], dim=1)
        types = torch.cat([types, torch.zeros((1, 1), dtype=types.dtype)], dim=1)
    return tokens


def assert_close(got: np.ndarray, ref: np.ndarray, what: str, rel: float = 1e-4) -> None:
    assert got.shape == ref.shape, what
    tol = rel * max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    assert err <= tol, f"{what}: max abs diff {err:.3g} > {tol:.3g}"


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    """This package's request tokenizer alone (no graph compile)."""
    from max.pipelines.lib import PIPELINE_REGISTRY, PipelineArgs, PipelineConfig

    config = PipelineConfig.from_args(PipelineArgs.from_flat_kwargs(
        model_path=str(checkpoint), device_specs="cpu", custom_architectures=["qwen3vl_moe"], max_length=65536,
    ))
    return PIPELINE_REGISTRY.retrieve_tokenizer(config)


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 700), st.integers(1, 700)), min_size=1, max_size=3),
    mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "LA"]), seed=st.integers(0, 2**16),
)
def test_processor_parity_with_transformers(tokenizer, hf_processor, sizes, mode, seed):
    """input_ids, image_grid_thw and pixel_values identical through the full request path."""
    import asyncio

    from qwen3vl_moe.api import _split_media
    from max.pipelines.context import SamplingParams
    from max.pipelines.modeling.types import RequestID, TextGenerationRequest

    sizes = [(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 200]  # transformers rejects the rest
    if not sizes:
        return
    images = [image(h, w, seed + i).convert(mode) for i, (h, w) in enumerate(sizes)]
    conv = conversation(images, "What differs?")
    chat, raw_images, _ = _split_media(conv)
    ctx = asyncio.run(tokenizer.new_context(TextGenerationRequest(
        request_id=RequestID(), model_name="m", messages=chat, images=raw_images,
        sampling_params=SamplingParams(max_new_tokens=1),
    )))
    ref = hf_inputs(hf_processor, conv)
    assert list(ctx.tokens.all[: len(ctx.tokens)]) == ref["input_ids"][0].tolist()
    assert ctx.vision_data.image_grid_thw.tolist() == ref["image_grid_thw"].tolist()
    assert np.array_equal(ctx.vision_data.concatenated_pixel_values, ref["pixel_values"].numpy())


@pytest.mark.parametrize("conv", [ONE_IMAGE, TWO_IMAGES], ids=["one_image", "two_images"])
def test_prompt_ids_and_vision_inputs_match(engine, hf_processor, conv):
    from max.pipelines.context import SamplingParams

    ctx = engine._context(conv, SamplingParams(max_new_tokens=1))
    ref = hf_inputs(hf_processor, conv)
    assert list(ctx.tokens.all[: len(ctx.tokens)]) == ref["input_ids"][0].tolist()
    assert ctx.vision_data.image_grid_thw.tolist() == ref["image_grid_thw"].tolist()
    assert np.array_equal(ctx.vision_data.concatenated_pixel_values, ref["pixel_values"].numpy())


def test_vision_encoder_matches_transformers(engine, reference, hf_processor):
    from max.driver import Buffer
    from max.pipelines.context import SamplingParams

    ctx = engine._context(TWO_IMAGES, SamplingParams(max_new_tokens=1))
    vd = ctx.vision_data
    vision = engine.pipeline._pipeline_model.vision_model
    outputs = vision.execute(
        Buffer.from_numpy(np.ascontiguousarray(vd.concatenated_pixel_values, dtype=np.float32)),
        Buffer.from_numpy(vd.image_grid_thw.astype(np.int64)),
        Buffer.from_numpy(vd.vision_position_ids.astype(np.int32)),
        Buffer.from_numpy(vd.cu_seqlens.astype(np.uint32)),
    )
    ours = [o.to_numpy() for o in outputs]
    ref_in = hf_inputs(hf_processor, TWO_IMAGES)
    with torch.no_grad():
        out = reference.model.visual(ref_in["pixel_values"], grid_thw=ref_in["image_grid_thw"])
    ref = [out.pooler_output, *out.deepstack_features]
    assert len(ours) == len(ref) == 1 + len(reference.config.vision_config.deepstack_visual_indexes)
    for i, (got, want) in enumerate(zip(ours, ref, strict=True)):
        want = want.float().numpy()
        assert got.shape == want.shape
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        assert rel <= 1e-4, f"vision output {i}: relative error {rel:.3g}"


@pytest.mark.parametrize("conv", [ONE_IMAGE, TWO_IMAGES], ids=["one_image", "two_images"])
def test_image_prompt_logits_match_transformers(engine, reference, hf_processor, conv):
    [ours] = engine.prefill_logits([conv])
    assert_close(ours, hf_logits(reference, hf_inputs(hf_processor, conv)), "prefill logits")


@pytest.mark.parametrize("conv", [ONE_IMAGE, TWO_IMAGES], ids=["one_image", "two_images"])
def test_image_greedy_continuation_matches_transformers(engine, reference, hf_processor, conv):
    [out] = engine.generate([conv], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.token_ids == hf_greedy(reference, hf_inputs(hf_processor, conv), NEW_TOKENS)


def test_text_and_image_requests_share_a_batch(engine):
    text_only = [{"role": "user", "content": "Say something about colours."}]
    batch = [text_only, ONE_IMAGE, TWO_IMAGES]
    together = engine.generate(batch, max_new_tokens=12, ignore_eos=True)
    for conv, got in zip(batch, together, strict=True):
        [alone] = engine.generate([conv], max_new_tokens=12, ignore_eos=True)
        assert got.token_ids == alone.token_ids


def test_placeholder_image_mismatch_is_a_clear_error(engine):
    from max.pipelines.context import SamplingParams
    from max.pipelines.modeling.types import RequestID, TextGenerationRequest
    import asyncio

    buf = io.BytesIO()
    image(32, 32, 3).save(buf, format="PNG")
    with pytest.raises(ValueError, match="number of images provided"):
        request = TextGenerationRequest(
            request_id=RequestID(), model_name="m",
            messages=[{"role": "user", "content": [{"type": "text", "text": "no image placeholder here"}]}],
            images=[buf.getvalue()], sampling_params=SamplingParams(max_new_tokens=1),
        )
        asyncio.run(engine.tokenizer.new_context(request))


def test_unreadable_image_is_a_clear_error(engine):
    conv = [{"role": "user", "content": [{"type": "image", "image": b"definitely not an image"}, {"type": "text", "text": "?"}]}]
    with pytest.raises(Exception, match="(?i)image"):
        engine.generate([conv], max_new_tokens=1)


# ----------------------------------------------------------------------------- video

def decode_all(video: bytes) -> np.ndarray:
    import av

    with av.open(io.BytesIO(video)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def hf_video_inputs(processor, video: bytes, fps: float, text: str) -> dict:
    from transformers.video_utils import VideoMetadata

    frames = decode_all(video)
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    meta = VideoMetadata(total_num_frames=len(frames), fps=fps, width=frames.shape[2], height=frames.shape[1])
    return dict(processor(text=[prompt], videos=[frames], video_metadata=[meta], do_sample_frames=True, return_tensors="pt"))


VIDEO = make_video(30, 10, 96, 128)  # 3 s at 10 fps -> 6 frames sampled at 2 fps, 3 temporal groups
VIDEO_CONV = [{"role": "user", "content": [{"type": "video", "video": VIDEO}, {"type": "text", "text": "What happens?"}]}]


@pytest.mark.parametrize("size", [(96, 128), (100, 130), (45, 300)], ids=["no_resize", "resize", "wide"])
def test_video_prompt_and_inputs_match_transformers(engine, hf_processor, size):
    from max.pipelines.context import SamplingParams

    video = make_video(23, 12, *size, seed=size[0])
    conv = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Describe"}]}]
    ctx = engine._context(conv, SamplingParams(max_new_tokens=1))
    ref = hf_video_inputs(hf_processor, video, 12.0, "Describe")
    # Token ids include the per-frame-group "<t seconds>" timestamps.
    assert list(ctx.tokens.all[: len(ctx.tokens)]) == ref["input_ids"][0].tolist()
    assert ctx.vision_data.image_grid_thw.tolist() == ref["video_grid_thw"].tolist()
    ours, theirs = ctx.vision_data.concatenated_pixel_values, ref["pixel_values_videos"].numpy()
    assert ours.shape == theirs.shape
    if size == (96, 128):  # no resize: identical
        assert np.array_equal(ours, theirs)
    else:  # PIL vs torchvision bicubic: at most one or two uint8 levels apart
        assert float(np.abs(ours - theirs).max()) <= 2 / 127.5 + 1e-6


def test_video_logits_and_greedy_match_transformers(engine, reference, hf_processor):
    ref_inputs = hf_video_inputs(hf_processor, VIDEO, 10.0, "What happens?")
    [ours] = engine.prefill_logits([VIDEO_CONV])
    assert_close(ours, hf_logits(reference, ref_inputs), "video prefill logits")

    [out] = engine.generate([VIDEO_CONV], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert out.token_ids == hf_greedy(reference, ref_inputs, NEW_TOKENS)


@pytest.mark.parametrize("payload", [b"", b"not a video at all"], ids=["empty", "garbage"])
def test_bad_video_is_a_clear_error(engine, payload):
    conv = [{"role": "user", "content": [{"type": "video", "video": payload}, {"type": "text", "text": "?"}]}]
    with pytest.raises(Exception, match="(?i)video|decode|frame"):
        engine.generate([conv], max_new_tokens=1)


@pytest.mark.parametrize("kind", ["one_image", "two_images", "video", "text"])
def test_3d_position_ids_match_get_rope_index(tokenizer, hf_processor, reference, kind):
    """MRoPE positions (t, h, w rows) and rope delta equal transformers' get_rope_index."""
    import asyncio

    from qwen3vl_moe.api import _split_media
    from max.pipelines.context import SamplingParams
    from max.pipelines.modeling.types import RequestID, TextGenerationRequest

    if kind == "video":
        conv, ref = VIDEO_CONV, hf_video_inputs(hf_processor, VIDEO, 10.0, "What happens?")
    elif kind == "text":
        conv = [{"role": "user", "content": [{"type": "text", "text": "Only words here, no pictures at all."}]}]
        ref = dict(hf_processor(text=[hf_processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)], return_tensors="pt"))
    else:
        conv = ONE_IMAGE if kind == "one_image" else TWO_IMAGES
        ref = hf_inputs(hf_processor, conv)
    chat, images, videos = _split_media(conv)
    ctx = asyncio.run(tokenizer.new_context(TextGenerationRequest(
        request_id=RequestID(), model_name="m", messages=chat, images=images, videos=videos,
        sampling_params=SamplingParams(max_new_tokens=1),
    )))
    ids = ref["input_ids"]
    positions, delta = reference.model.get_rope_index(
        ids, image_grid_thw=ref.get("image_grid_thw"), video_grid_thw=ref.get("video_grid_thw"),
        attention_mask=torch.ones_like(ids), mm_token_type_ids=ref.get("mm_token_type_ids"),
    )
    assert np.array_equal(ctx.decoder_position_ids, positions[:, 0].numpy())
    assert int(ctx.rope_delta) == int(delta.reshape(-1)[0])
