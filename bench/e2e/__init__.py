"""End-to-end benchmark of this package (MAX) against transformers and llama.cpp, measured in one run.

    python bench/e2e                         # CPU, float32, the `medium` tiny preset, every contender
    python bench/e2e --quick                 # fewer rounds and tokens, no cold compile
    python bench/e2e --contenders ours,hf    # leave llama.cpp out (no build, no conversion)
    python bench/e2e --devices gpu           # bfloat16 on ours and transformers by default
    python bench/e2e --model-path DIR        # any Qwen3-VL (MoE or dense) checkpoint directory

Contenders (``--contenders``, comma separated):

- ``ours``: this package through MAX's pipeline;
- ``hf`` (= ``hf:grouped_mm,hf:eager``): transformers with its default
  ``experts_implementation="grouped_mm"`` and with ``"eager"`` (the per-expert
  loop), one process switched between the two with
  ``model.set_experts_implementation`` (same weights);
- ``llama`` (= ``llama:f32,llama:f16,llama:q8_0``): llama.cpp's own tools
  (``llama-bench``, ``llama-batched-bench``, ``llama-mtmd-cli``) on the
  checkpoint converted to GGUF with llama.cpp's ``convert_hf_to_gguf.py``, text
  weights in that type, the vision projector (mmproj) in F32. llama.cpp is
  built from source on first use into a cache (``--llama-build`` /
  ``$QWEN3VL_LLAMA_BUILD`` reuse an existing build directory). See
  ``llamacpp.py``.

Protocol (``protocol.py``): ``ours`` and transformers each run in a worker
subprocess that stays loaded; llama.cpp's tools are started per timed call.
The driver runs one timed call at a time, round-robin over the contenders
within each round, so the load of other processes on the machine hits every
contender alike, and stops every other worker (SIGSTOP/SIGCONT) while one is
timed: an idle worker is not idle (MAX's runtime polls from a thread, torch
keeps threads), and on two cores that alone slowed transformers by up to 50%
before this was done. Timings are medians over ``--repeats`` rounds after
``--warmup`` rounds. Peak RSS is each process's own high-water mark (workers:
VmHWM; llama.cpp's tools: ``ru_maxrss`` as a small wrapper process sees it; a
child forked from the driver itself would inherit the driver's peak). Our
worker runs as the package's base install does, without torch
(``workers.hide_torch``): the benchmark's environment has torch for
transformers, and MAX would otherwise import it (0.65 GiB of RSS) through
transformers.

Measured:

- prefill tokens/s: a ``--prompt-len`` (512) token prompt at batch 1, up to
  the first sampled token (llama.cpp: ``llama-bench -p 512``);
- decode tokens/s at batch 1 after that prompt and at batch ``--batch`` (8)
  with ``--batch-prompt-len`` token prompts: ``--new-tokens`` greedy tokens,
  EOS ignored, timed after the first (transformers: ``generate`` with a logits
  processor as the step clock; llama.cpp: ``llama-bench -n N -d 512`` and
  ``llama-batched-bench -npl 8``, its KV cache in ``--llama-kv-type``);
- vision encoder ms per ``--image-size`` (448) square image, the encoder
  alone (llama.cpp: the encoding time ``llama-mtmd-cli`` logs);
- peak RSS per contender;
- the decode floor (``floor.py``): weights read per decode step over the
  memory bandwidth measured in the same run, per weight type;
- our graph compile time, cold (fresh ``MODULAR_CACHE_DIR`` and ``TMPDIR``)
  and cached, as MAX's own compilation timer logs it;
- a sanity check (not a test): llama.cpp F32 greedy text equals
  transformers' on a short prompt.

Ratios and the targets of issues 6 and 14 are in ``report.py``. Writes
``bench/results/e2e-<device>[-quick]-<date>[-<tag>].json`` and prints the
tables as markdown.
"""
