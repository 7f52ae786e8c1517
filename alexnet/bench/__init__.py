"""Throughput benchmarks: where the time goes, measured so that comparisons hold on a busy machine.

* timing.py: interleaved windows (A B C A B C ...), warm-up, medians, paired ratios, settling;
* pipeline_bench.py: input pipelines alone against a decode-only ceiling;
* training.py: timed training steps and the split of a step into data wait, compute, communication;
* step_bench.py: training steps on synthetic on-device data for each parallel layout;
* e2e_bench.py: training steps on real files, next to the same steps on synthetic data;
* sweep.py: one torchrun per process count, scaling efficiency against the smallest;
* profile.py: which operations a step's time goes to (torch.profiler, after the timed windows);
* flops.py: counted FLOPs and peak FLOPS for MFU; envinfo.py: versions, devices, commit;
* output.py: the report (JSON, CSV, table, PNG).
"""
