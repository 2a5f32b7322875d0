"""What the benchmark scripts share: peak memory of one run beyond what was held before it."""


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def peak_bytes(run, device: str) -> int:
    """Peak bytes ``run()`` needs beyond what is held before it. CUDA: max allocated minus allocated
    before; CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS before."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss("VmRSS")
    run()
    return (torch.cuda.max_memory_allocated() if device.startswith("cuda") else _rss("VmHWM")) - before
