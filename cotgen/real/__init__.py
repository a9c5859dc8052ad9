"""Real models behind cotgen's interfaces (DESIGN sections 3-4, issue 9).

- :mod:`cotgen.real.janus`: Janus-Pro (``JanusForConditionalGeneration``) as a Generator
  (step-wise raster sampling with CFG and a KV cache, path dropping, intermediate images
  through its VQ decoder, image-token log-probabilities through its generation head) and
  DPO on it through trl's ``DPOTrainer`` (:func:`cotgen.real.janus.train_janus_dpo`).
- :mod:`cotgen.real.judge`: pretrained VLM judges (LLaVA-OneVision, Qwen2-VL) through
  :class:`cotgen.reward.vlm_judge.VLMJudge`.
- :mod:`cotgen.real.detector`: Mask2Former + CLIP as a GenEval Detector with GenEval's
  semantics.
- :mod:`cotgen.real.config`: ``params.yaml``'s ``world:`` / ``real:`` selection and
  loading from local folders or the Hugging Face cache (offline flags respected).
- :mod:`cotgen.real.tiny`: tiny randomly initialised configs of the same classes (tests,
  CPU smoke runs; ``source: tiny`` in ``real:``).

The real world's pipeline stages are in :mod:`cotgen.pipeline.coco` (``real/dvc.yaml``).

Nothing here downloads weights unless the caller's environment allows it.
"""
