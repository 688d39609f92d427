"""Run ``mergekit-evolve`` (mergekit 0.1.5, LGPL) on a CPU, logging every evaluation.

Executed by scripts/bench/vs_mergekit_evolve.py with the THROWAWAY mergekit venv's python
(scripts/mergekit_venv.sh, then ``pip install 'mergekit[evolve]'`` into it); evomerge never
imports mergekit. Nothing of mergekit is copied here: its own CLI entry point runs unchanged,
with CPU shims around it:

1. ``lm_eval.models.vllm_causallms``: mergekit's actor module names its ``VLLM`` class in a type
   annotation at import time; without vLLM (no CPU build) that module cannot import, so an
   stand-in module with an empty ``VLLM`` class takes its place, in the driver and in every Ray
   worker (``worker_process_setup_hook``); ``--no-vllm`` never uses it;
2. Ray is started with as many *logical* GPUs as workers: mergekit's Ray tasks and actors ask
   for ``num_gpus=1``; for Ray that is a scheduling resource, and with ``--no-merge-cuda
   --no-vllm`` nothing touches CUDA;
4. ``torch.cpu.empty_cache`` (which mergekit's on-disk actor calls before every merge through
   its accelerator helper) is given a do-nothing stand-in where torch has none;
5. lm-eval's ``HFLM`` gets ``device="cpu"`` unless told otherwise (its default is ``cuda``, and
   Ray's logical GPU makes it believe one is there);
3. the evaluation strategy's ``evaluate_genotypes`` is wrapped to append one JSON line per
   evaluated genotype (seconds since start, score, the mergekit merge config) to the log.

    python _mergekit_evolve_run.py WORKERS LOGFILE -- <mergekit-evolve arguments>
"""

import json
import os
import sys
import time


def cpu_shims() -> None:  # shims 1, 4 and 5, in the driver and in every Ray worker (setup hook)
    import torch

    if not hasattr(torch.cpu, "empty_cache"):
        torch.cpu.empty_cache = lambda: None
    import lm_eval.models
    import lm_eval.models.huggingface as hf

    if not getattr(hf.HFLM.__init__, "_cpu_shim", False):
        init = hf.HFLM.__init__

        def cpu_init(self, *args, **kwargs):
            kwargs.setdefault("device", "cpu")
            init(self, *args, **kwargs)

        cpu_init._cpu_shim = True
        hf.HFLM.__init__ = cpu_init

    try:
        import lm_eval.models.vllm_causallms  # noqa: F401
    except ImportError:
        import types

        stand_in = types.ModuleType("lm_eval.models.vllm_causallms")
        stand_in.VLLM = type("VLLM", (), {})  # mergekit sets class attributes on it; never instantiated
        sys.modules[stand_in.__name__] = stand_in
        lm_eval.models.vllm_causallms = stand_in


def main() -> None:
    t0 = time.time()
    workers, log_path = int(sys.argv[1]), sys.argv[2]
    assert sys.argv[3] == "--", "usage: WORKERS LOGFILE -- <mergekit-evolve arguments>"
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")
    cpu_shims()
    import ray

    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=workers, num_gpus=workers, include_dashboard=False,  # shim 2
             runtime_env={"worker_process_setup_hook": "_mergekit_evolve_run.cpu_shims",
                          "env_vars": {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                                       "PYTHONPATH": path}})
    import mergekit.evo.strategy as strategy

    def logged(cls):  # shim 3
        inner = cls.evaluate_genotypes

        def evaluate_genotypes(self, genotypes):
            res = inner(self, genotypes)
            with open(log_path, "a") as f:
                for x, r in zip(genotypes, res):
                    cfg = self.genome.genotype_merge_config(x).to_yaml()
                    f.write(json.dumps({"t": time.time() - t0, "score": r.get("score"), "config": cfg},
                                       default=str) + "\n")
            return res

        cls.evaluate_genotypes = evaluate_genotypes

    for name in ("ActorPoolEvaluationStrategy", "BufferedRayEvaluationStrategy", "SerialEvaluationStrategy"):
        logged(getattr(strategy, name))
    from mergekit.scripts.evolve import main as evolve

    sys.argv = ["mergekit-evolve", *sys.argv[4:]]
    evolve(standalone_mode=False)


if __name__ == "__main__":
    main()
