"""The one boundary to MAX internals.

Everything this package needs from MAX beyond its public API (underscore
modules, private attributes, classes of another architecture, patched
routes) is reached from here, each use with a comment naming the MAX
behaviour it depends on. Porting to a new MAX release starts in this file:
the version check below says which releases these assumptions were tested
against.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

# Releases of the `modular` package whose internals this module was checked against.
TESTED_MAX_VERSIONS = ("26.7.0",)


def check_max_version() -> str:
    """The installed MAX version; raises a clear error for one this package was not tested with.

    ``QWEN3VL_MOE_ALLOW_UNTESTED_MAX=1`` turns the error into a warning, for
    someone porting the package to a new release.
    """
    import os
    import warnings

    try:
        version = importlib.metadata.version("modular")
    except importlib.metadata.PackageNotFoundError:
        try:
            version = importlib.metadata.version("max")
        except importlib.metadata.PackageNotFoundError as e:
            raise ImportError("qwen3vl_moe needs MAX: pip install modular==26.7.0") from e
    if version not in TESTED_MAX_VERSIONS:
        message = (
            f"qwen3vl_moe was tested with MAX {', '.join(TESTED_MAX_VERSIONS)}, but MAX {version} is "
            "installed; its use of MAX internals (python/qwen3vl_moe/max_compat.py) may not hold. "
            "Install modular==26.7.0, or set QWEN3VL_MOE_ALLOW_UNTESTED_MAX=1 to try anyway."
        )
        if os.environ.get("QWEN3VL_MOE_ALLOW_UNTESTED_MAX") != "1":
            raise ImportError(message)
        warnings.warn(message, stacklevel=2)
    return version


MAX_VERSION = check_max_version()



# ---------------------------------------------------------------------------
# MAX's built-in Qwen3-VL architecture, reused.
#
# The pipeline model, configs, tokenizer, request context and batch processor
# of ``max.pipelines.architectures.qwen3vl_moe`` define the inputs contract
# this package honours (its tokenizer renders the chat template and computes
# the 3-D positions exactly as transformers does; tested). They are another
# architecture's modules, not MAX's public API, so they are imported here
# only. Relied on beyond their public names: the built-in model's
# ``_load_state_dict`` / ``_create_model_config`` hooks (overridden by
# ``model.Qwen3VLModel``); the built-in tokenizer's
# ``_preprocess_one_clip`` (overridden for precise video errors) and its
# ``img_processor`` attribute (replaced by the transformers-exact processor).

from max.pipelines.architectures.qwen2_5vl.nn.qwen_vl_utils import smart_resize as smart_resize  # noqa: E402
from max.pipelines.architectures.qwen3vl_moe.batch_processor import Qwen3VLMoeBatchProcessor as Qwen3VLMoeBatchProcessor  # noqa: E402
from max.pipelines.architectures.qwen3vl_moe.context import Qwen3VLTextAndVisionContext as Qwen3VLTextAndVisionContext  # noqa: E402
from max.pipelines.architectures.qwen3vl_moe.model import Qwen3VLInputs as Qwen3VLInputs  # noqa: E402
from max.pipelines.architectures.qwen3vl_moe.model import Qwen3VLModel as BuiltinQwen3VLModel  # noqa: E402
from max.pipelines.architectures.qwen3vl_moe.model_config import (  # noqa: E402
    Qwen3VLConfig as BuiltinQwen3VLConfig,  # noqa: F401  (re-exported)
    VisionConfig as BuiltinVisionConfig,  # noqa: F401  (re-exported)
)
from max.pipelines.architectures.qwen3vl_moe.tokenizer import Qwen3VLTokenizer as BuiltinQwen3VLTokenizer  # noqa: E402


class Qwen3VLBatchProcessor(Qwen3VLMoeBatchProcessor):
    """MAX's Qwen3-VL batch processor, with positions relative to the KV cache,
    its empty image embeddings in the graphs' dtype and a shortcut for decode steps.

    Relied on (``batch_processor.py``, 26.7.0): ``empty_image_embeddings``
    builds zero-row (image, deepstack) buffers in the encoding's dtype and
    caches them in ``_cached_empty_embeddings``. For ``float8_e4m3fn`` that is
    float8, while the decoder graph takes bfloat16 embeddings (the FP8 encoding
    computes in bfloat16, see ``model_config.Qwen3VLConfig``); the cached
    buffers are replaced by bfloat16 ones of the same shapes and devices.

    ``prepare_initial_token_inputs`` builds every step's inputs anew, with
    each token's absolute 3-D position in a host buffer. This package's
    decoder graph takes positions relative to each sequence's KV cache length
    instead, on the first device, and adds the cache lengths itself
    (``nn.rotary.absolute_positions``): the KV cache manager passes
    ``processed_length`` as a sequence's cache length
    (``paged_kv_cache/cache_manager.py``, ``runtime_inputs``: plus accepted
    draft tokens, which this architecture never has). So the general path
    subtracts each row's ``processed_length`` from MAX's positions.

    For a context with no vision encoding pending, MAX places the step's
    tokens at ``processed_length + rope_delta + arange(active_length)`` in
    each of the ``_mrope_section_length()`` MRoPE sections, its row offsets
    are the cumulative active lengths and its image token indices are empty
    (``compute_multimodal_merge_indices`` only emits them for contexts that
    need vision encoding). A decode step (one token per context, none of
    them encoding images) therefore takes, relative to the cache, each
    row's ``rope_delta``: the same every step of a batch. Its positions,
    row offsets and ``return_n_logits`` are device buffers made once and
    reused while the batch is unchanged; only the tokens are copied per
    step (medium preset, interleaved, before positions moved into the
    graph: 0.30 -> 0.18 ms a step at batch 1, 0.37 -> 0.16 ms at batch 8).
    Any other step goes to MAX's.
    """

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._decode_step_buffers: dict[tuple[int, int], tuple[list[Any], Any]] = {}
        # (the batch's rope deltas, their [sections, batch] buffer on the first device):
        # the last decode batch's only, so that memory stays bounded whatever the traffic.
        self._decode_positions: tuple[tuple[int, ...], Any] | None = None

    def prepare_initial_token_inputs(self, replica_batches, kv_cache_inputs=None, return_n_logits=1):  # type: ignore[no-untyped-def]
        import numpy as np
        from max.driver import Buffer

        devices = self.runtime.devices
        batch = replica_batches[0] if len(replica_batches) == 1 else ()
        if not batch or kv_cache_inputs is None or any(
            ctx.needs_vision_encoding or ctx.tokens.active_length != 1 for ctx in batch
        ):
            inputs = super().prepare_initial_token_inputs(
                replica_batches, kv_cache_inputs=kv_cache_inputs, return_n_logits=return_n_logits
            )
            absolute = inputs.decoder_position_ids.to_numpy()
            cached = np.repeat(
                np.array([ctx.tokens.processed_length for ctx in batch], dtype=np.int64),
                [ctx.tokens.active_length for ctx in batch],
            )
            inputs.decoder_position_ids = Buffer.from_numpy(np.ascontiguousarray(absolute - cached)).to(devices[0])
            return inputs
        key = (len(batch), return_n_logits)
        if key not in self._decode_step_buffers:
            offsets = Buffer.from_numpy(np.arange(len(batch) + 1, dtype=np.uint32))
            self._decode_step_buffers[key] = (
                [offsets.to(device) for device in devices],
                Buffer.from_numpy(np.array([return_n_logits], dtype=np.int64)),
            )
        row_offsets, n_logits = self._decode_step_buffers[key]
        deltas = tuple(int(ctx.rope_delta) for ctx in batch)
        if self._decode_positions is None or self._decode_positions[0] != deltas:
            relative = np.broadcast_to(np.array(deltas, dtype=np.int64), (self._mrope_section_length(), len(batch)))
            self._decode_positions = (deltas, Buffer.from_numpy(np.ascontiguousarray(relative)).to(devices[0]))
        return Qwen3VLInputs(
            tokens=Buffer.from_numpy(np.concatenate([ctx.tokens.active for ctx in batch])).to(devices[0]),
            input_row_offsets=row_offsets,
            signal_buffers=list(self.runtime.signal_buffers),
            decoder_position_ids=self._decode_positions[1],
            return_n_logits=n_logits,
            kv_cache_inputs=kv_cache_inputs,
            image_token_indices=self.empty_image_token_indices(),
            pixel_values=None,
            vision_position_ids=None,
            weights=None,
            indices=None,
            max_grid_size=None,
            cu_seqlens=None,
            max_seqlen=None,
            grid_thw=None,
        )

    def empty_image_embeddings(self):  # type: ignore[no-untyped-def]
        from max.driver import Buffer
        from max.dtype import DType

        image, deepstack = super().empty_image_embeddings()
        if image and image[0].dtype == DType.float8_e4m3fn:
            def bf16(b):  # type: ignore[no-untyped-def]
                return Buffer.zeros(shape=b.shape, dtype=DType.bfloat16).to(b.device)

            self._cached_empty_embeddings = ([bf16(b) for b in image], [bf16(b) for b in deepstack])
            image, deepstack = self._cached_empty_embeddings
        return image, deepstack


def _require(owner: type, names: tuple[str, ...]) -> None:
    missing = [name for name in names if not hasattr(owner, name)]
    if missing:
        raise ImportError(
            f"MAX {MAX_VERSION}: {owner.__module__}.{owner.__qualname__} no longer has {missing}, which "
            "qwen3vl_moe overrides (see python/qwen3vl_moe/max_compat.py)"
        )


_require(BuiltinQwen3VLModel, ("_load_state_dict", "_create_model_config", "graph_specs", "execute"))
_require(Qwen3VLMoeBatchProcessor, ("empty_image_embeddings", "empty_image_token_indices", "_mrope_section_length",
                                    "prepare_initial_token_inputs"))
_require(BuiltinQwen3VLTokenizer, ("_preprocess_one_clip", "new_context"))


def run_max_cli(argv: list[str]) -> int:
    """Runs the ``max`` command line in this process (``max serve ...``) and returns its exit code.

    Depends on: ``max._entrypoints.pipelines.main``, what the ``max`` console
    script calls, reading its arguments from ``sys.argv``.
    """
    import sys

    from max._entrypoints.pipelines import main

    sys.argv = ["max", *argv]
    return int(main() or 0)


def run_max_commands(commands: list[list[str]]) -> None:
    """Runs several ``max`` commands one after another in this process (raises on a failing one).

    What a virtual-device compile of several device counts in one process
    needs (``warm-cache --target`` sets the virtual device count per command).
    Depends on: ``max._entrypoints.pipelines.main`` being a click group, whose
    ``main(args, standalone_mode=False)`` runs one command and returns rather
    than exiting; the ``--custom-architectures`` import working when repeated.
    """
    from max._entrypoints.pipelines import main

    for argv in commands:
        main.main(list(argv), standalone_mode=False)


def pipeline_model_of(pipeline: Any) -> Any:
    """The pipeline model inside a text-generation pipeline (MAX keeps it in ``_pipeline_model``)."""
    return pipeline._pipeline_model


# ---------------------------------------------------------------------------
# Building a Mojo package the way MAX does.
#
# Given a source directory in ``custom_extensions``, MAX 26.7 runs
# ``mojo precompile DIR -o $TMPDIR/.modular_<uid>/mojo_pkg/mojo_pkg_<md5(path)>.mojoc``
# through ``mojo.run.subprocess_run_mojo`` (``mojo.paths._build_mojo_source_package``)
# at every graph build and every compile, rewriting the file each time.
# ``kernels.kernel_extension`` runs the same command once per content and
# passes the built file instead. Relied on: ``subprocess_run_mojo`` running the
# ``mojo`` bundled with MAX with MAX's import paths set (the wheel's driver
# and ``lib/mojo``), so the package is built against the same ``std`` and
# ``max`` packages the graph compiler links; and a ``.mojoc`` being read back
# with its module named after the file's stem: the graph compiler's generated
# Mojo code does ``import <stem>``, so the stem must be a plain identifier
# (``.x.mojoc`` fails with "relative imports must use 'from'", ``a.b.mojoc``
# with "unable to locate module 'a'"; both seen on 26.7.0).


def mojo_precompile(source: Path, out: Path) -> None:
    """``mojo precompile source -o out`` with MAX's bundled Mojo; raises MAX's own error on failure."""
    import subprocess

    from mojo.paths import MojoCompilationError
    from mojo.run import subprocess_run_mojo

    args = ["precompile", str(source), "-o", str(out)]
    try:
        subprocess_run_mojo(args, capture_output=True, check=True)
    except subprocess.CalledProcessError as e:
        raise MojoCompilationError.from_subprocess_error(source, args, e) from e


# ---------------------------------------------------------------------------
# Graph groups: one package listed once per compile group.
#
# ``compile_graphs`` compiles the graphs of one group with the concatenation
# of their members' ``custom_extensions``, and a package listed twice fails
# ("kernel ... registered multiple times"). So a package shared by two graphs
# is listed by one member and named by the others for tracing only. Tracing
# analyses a graph's kernel libraries once per set of paths
# (``KernelLibrary._analysis_cache``, keyed by the paths), so members that
# trace with the same set share one analysis.

from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from max.pipelines.lib.graph_specs import GraphSpec  # noqa: E402


@dataclass(frozen=True)
class GroupMemberSpec(GraphSpec):
    """A graph traced also with packages another graph of its group lists (tracing only:
    packages it uses, or that make its set of paths the other graphs' set)."""

    listed_by_group: tuple[Path, ...] = ()

    def trace(self, module: Any = None) -> Any:
        return self.module.trace(
            *self.input_types,
            name=self.name,
            module=module,
            custom_extensions=(*self.custom_extensions, *self.listed_by_group),
            is_device_graph=self.is_device_graph,
        )


# ---------------------------------------------------------------------------
# MAX's CPU worker threads, by name.
#
# MAX 26.7's CPU runtime names its worker threads "Thread0", "Thread1", ...
# (one per core, the number being the worker's index); cpu_threads sets their
# priority and pins them to cores by that name, since MAX offers no working
# knob for their busy-wait (``MODULAR_THREAD_BUSY_WAIT_US`` and
# ``InferenceSession(num_threads=...)`` abort).

import re  # noqa: E402

MAX_CPU_WORKER_THREAD_NAME = re.compile(r"Thread(\d+)$")


# ---------------------------------------------------------------------------
# CPU runs float32 when no encoding is asked for.
#
# MAX behaviour relied on (max/pipelines/lib/config/config.py, 26.7.0):
# ``PipelineConfig._model_with_resolved_weights(model, arch)`` (a private
# staticmethod) resolves the encoding of a model with no
# ``quantization_encoding``: it drops a checkpoint encoding the device cannot
# run (bfloat16 or float8 on CPU) and falls back to the architecture's single
# ``default_encoding`` (bfloat16, right for GPUs), which it then refuses on
# CPU ("The encoding 'bfloat16' is not compatible with the selected device
# type 'cpu'"). Given ``quantization_encoding='float32'`` instead, it records a
# bfloat16 -> float32 load-time cast and finds the weight files. There is no
# public per-device default, so for this package's architectures, on an
# all-CPU device list with no encoding given, the model config is handed to
# that resolver as if ``float32`` had been asked for; the weight adapter then
# upcasts (or dequantizes) and logs it. Explicit encodings and GPUs are untouched.


def default_cpu_encoding_to_float32(pipeline_model: type) -> None:
    """Makes float32 the encoding on CPU, when none is given, of architectures running ``pipeline_model`` (idempotent)."""
    from max.pipelines.lib.config.config import PipelineConfig

    resolve = PipelineConfig.__dict__["_model_with_resolved_weights"].__func__
    models = getattr(resolve, "_cpu_float32_models", None)
    if models is not None:
        models.add(pipeline_model)
        return
    models = {pipeline_model}

    def resolve_with_cpu_float32(model, arch):
        if (
            getattr(arch, "pipeline_model", None) in models
            and model.quantization_encoding is None
            and model.device_specs
            and all(spec.device_type == "cpu" for spec in model.device_specs)
        ):
            model = model.model_copy(update={"quantization_encoding": "float32"})
        return resolve(model, arch)

    resolve_with_cpu_float32._cpu_float32_models = models  # type: ignore[attr-defined]
    PipelineConfig._model_with_resolved_weights = staticmethod(resolve_with_cpu_float32)


# --- Serving hooks (issue 12: the server survives every client) -------------
#
# MAX 26.7 offers no public hook for a custom architecture to reach the
# FastAPI app `max serve` builds, nor to fail one request when a batch's
# `execute` raises. Both uses below are installed when this package's
# architecture module is imported, so they hold under plain
# `max serve --custom-architectures qwen3vl_moe` as well as `qwen3vl-moe serve`.
# Each patches its MAX module when that module is imported (at once if it
# already is): importing MAX's server (~1 s, the OpenAI schemas) would
# otherwise be part of every model load, served or not.

import importlib.abc  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402


class _PatchOnImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs ``patch(module)`` right after ``name`` is first executed (a one-shot import hook)."""

    def __init__(self, name: str, patch: Any) -> None:
        self.name, self.patch, self.loader = name, patch, None

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            self.loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        self.patch(module)


def patch_when_imported(name: str, patch: Any) -> None:
    """``patch(module)`` now if module ``name`` is imported, else right after its import."""
    module = sys.modules.get(name)
    if module is not None:
        patch(module)
    elif not any(isinstance(f, _PatchOnImport) and f.name == name and f.patch is patch for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport(name, patch))


def on_serving_app(install):  # type: ignore[no-untyped-def]
    """Calls ``install(app)`` on the FastAPI app ``max serve`` builds, before it serves.

    Depends on: ``max._entrypoints.cli.serve.serve_api_and_model_worker``
    calling the module-global ``fastapi_app`` (imported from
    ``max.serve.api_server``) once per server; rebinding that global is the
    only way in. Idempotent per ``install``.
    """

    def wrap(entry):  # type: ignore[no-untyped-def]
        build = entry.fastapi_app
        installed = getattr(build, "_qwen3vl_moe_installs", ())
        if install in installed:
            return

        def fastapi_app(*args, **kwargs):  # type: ignore[no-untyped-def]
            app = build(*args, **kwargs)
            install(app)
            return app

        fastapi_app._qwen3vl_moe_installs = (*installed, install)  # type: ignore[attr-defined]
        entry.fastapi_app = fastapi_app

    patch_when_imported("max._entrypoints.cli.serve.serve_api_and_model_worker", wrap)


def fail_batch_on_execute_error(model_class: type) -> None:
    """An exception from a batch's ``pipeline.execute`` fails that batch's
    requests (each gets the error as a 4xx) instead of ending the model worker.

    Depends on: ``TokenGenerationScheduler._schedule(inputs)`` running
    ``self.pipeline.execute(inputs)`` with no handler (an escaping exception
    ends ``run_iteration``, the model worker, and with it the API server);
    ``self.batch_constructor.contains/release_request`` freeing a request's
    KV cache; ``SchedulerResult.failed(message)`` reaching the client as
    ``InputError(message)``; the text pipeline keeping its pipeline model in
    ``_pipeline_model``, which limits this to pipelines running ``model_class``.
    """
    import logging

    from max.serve.scheduler.text_generation_scheduler import TokenGenerationScheduler
    from max.serve.scheduler_result import SchedulerResult

    schedule = TokenGenerationScheduler._schedule
    if getattr(schedule, "_qwen3vl_moe", False):
        return

    def _schedule(self, inputs):  # type: ignore[no-untyped-def]
        try:
            return schedule(self, inputs)
        except Exception as e:
            if not isinstance(getattr(self.pipeline, "_pipeline_model", None), model_class):
                raise
            logging.getLogger("qwen3vl_moe").exception("a batch failed; failing its requests, serving on")
            message = f"the model failed on this request's batch ({type(e).__name__}: {e})"
            failed = [ctx.request_id for ctx in inputs.flat_batch if self.batch_constructor.contains(ctx.request_id)]
            for request_id in failed:
                self.batch_constructor.release_request(request_id)
            if failed:
                self.response_queue.put_nowait({rid: SchedulerResult.failed(message) for rid in failed})
            return len(failed)

    _schedule._qwen3vl_moe = True  # type: ignore[attr-defined]
    TokenGenerationScheduler._schedule = _schedule  # type: ignore[method-assign]


def deadline_on_media_fetches(seconds: float) -> None:
    """Resolving one media reference of a chat request takes at most ``seconds``, all told.

    Depends on: ``max.serve.router.openai_routes`` resolving every image and
    video reference through its module-global ``resolve_image_from_url``
    (imported from ``_image_resolution``), whose own timeouts are per read: a
    host sending one byte every few seconds would hold the request open
    indefinitely. The refusal is an ``InputError`` (a 400 naming the limit).
    """
    import asyncio

    from max.pipelines.context import InputError

    def wrap(openai_routes):  # type: ignore[no-untyped-def]
        resolve = openai_routes.resolve_image_from_url
        if getattr(resolve, "_qwen3vl_moe", False):
            return

        async def resolve_image_from_url(image_ref, *args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                return await asyncio.wait_for(resolve(image_ref, *args, **kwargs), seconds)
            except TimeoutError:
                raise InputError(
                    f"fetching media from {str(image_ref)[:120]} took longer than {seconds:g} s, the server's "
                    "limit for one media item (QWEN3VL_MOE_MEDIA_FETCH_DEADLINE_S)"
                ) from None

        resolve_image_from_url._qwen3vl_moe = True  # type: ignore[attr-defined]
        openai_routes.resolve_image_from_url = resolve_image_from_url

    patch_when_imported("max.serve.router.openai_routes", wrap)
