"""Evaluation in simulation: the OpenVLA-OFT LIBERO protocol (``sf eval libero``).

    from spatial_forcing.eval.runner import evaluate_libero
    from spatial_forcing.eval.policies import PolicyRef

    results = evaluate_libero(PolicyRef.parse("ckpt/step-50000/policy"), "libero_spatial", workers=4)

Files: ``protocol.py`` (settings and the pure protocol functions), ``policies.py`` (the harness's policy
protocol and its implementations), ``rollout.py`` (one episode, one task's env), ``runner.py`` (suites,
jobs, worker processes, resume), ``results.py`` (JSONL, JSON and Markdown reports), ``video.py`` (MP4s),
``cli.py`` (the command). Importing this package imports no simulator and no torch.
"""
