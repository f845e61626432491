"""auxtl's small_cnn steps in PyTorch, as a worker serving timing requests.

Run by another interpreter (torch is never an auxtl dependency):

    python torch_step.py '{"batch_size": 128, "kinds": ["pretrain"], "modes": ["eager"],
                           "warmup": 2}'

builds every kind x mode, runs `warmup` untimed steps of each (torch.compile compiles
here), prints one line `AUXTL_TORCH_READY {json}` (versions, threads, device, and per
case its warm-up seconds or its error), then answers each stdin line
`{"kind": K, "mode": M, "steps": N, "warmup": W}` with one line
`AUXTL_TORCH_RESULT {"kind": K, "mode": M, "step_times_s": [...]}` (or `"error"`),
until stdin closes. Each timed step runs to completion (CUDA synchronised).

kinds: pretrain       rotation pretraining: normalised images rotated 4 ways inside the
                      step, 4-way head, cross-entropy, SGD lr 0.05 nesterov 0.9, weight
                      decay 5e-4 on kernels
       frozen_prefix  10-way fine-tuning with conv1-4 frozen (no gradients, BatchNorm on
                      running statistics); SGD lr 1e-3 nesterov 0.9, weight decay 1e-4 on
                      the trainable kernels
modes: eager (NCHW contiguous), channels_last (eager, channels-last memory format),
       compile (torch.compile of the channels-last model)
"""
import json
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

READY, RESULT = "AUXTL_TORCH_READY ", "AUXTL_TORCH_RESULT "
NUM_CLASSES = 10          # auxtl.bench.throughput_cases.NUM_CLASSES
FROZEN_CONVS = 4          # auxtl.bench.throughput_cases.layers_to_freeze, small_cnn
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ConvBlock(nn.Module):  # conv3x3 (no bias) -> BN -> ReLU [-> 2x2 max-pool], as auxtl's
    def __init__(self, i, o, pool):
        super().__init__()
        self.conv = nn.Conv2d(i, o, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(o, momentum=0.1)   # flax momentum 0.9, eps 1e-5 both
        self.pool = pool

    def forward(self, x):
        x = F.relu(self.bn(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pool else x


class SmallCNN(nn.Module):  # conv 32-32, pool, 64-64, pool, 128, GAP, dense 128 + ReLU, head
    def __init__(self, classes):
        super().__init__()
        widths, pools = (1, 32, 32, 64, 64, 128), (False, True, False, True, False)
        self.convs = nn.ModuleList(ConvBlock(i, o, p)
                                   for i, o, p in zip(widths, widths[1:], pools))
        self.fc = nn.Linear(128, 128)
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        for block in self.convs:
            x = block(x)
        return self.head(F.relu(self.fc(x.mean((2, 3)))))


def sgd(params, lr, weight_decay):
    """SGD nesterov 0.9 with weight decay on kernels (ndim > 1) only, as auxtl's optimizer."""
    params = list(params)
    return torch.optim.SGD([{"params": [p for p in params if p.ndim > 1],
                             "weight_decay": weight_decay},
                            {"params": [p for p in params if p.ndim <= 1],
                             "weight_decay": 0.0}], lr=lr, momentum=0.9, nesterov=True)


def build_step(kind, mode, batch):
    """A no-argument callable running one training step of `kind` in `mode`."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8, generator=gen)
    images = images.to(device)
    x01 = images.float() / 255          # per-channel (one channel) population statistics
    mean, std = x01.mean(), x01.std(unbiased=False)
    layout = torch.contiguous_format if mode == "eager" else torch.channels_last
    model = SmallCNN(4 if kind == "pretrain" else NUM_CLASSES).to(device)
    model = model.to(memory_format=layout).train()
    if kind == "pretrain":
        opt = sgd(model.parameters(), 0.05, 5e-4)
        labels = torch.arange(4, device=device).repeat_interleave(batch)
    elif kind == "frozen_prefix":
        for block in model.convs[:FROZEN_CONVS]:
            block.requires_grad_(False)
            block.bn.eval()
        opt = sgd((p for p in model.parameters() if p.requires_grad), 1e-3, 1e-4)
        labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    net = torch.compile(model) if mode == "compile" else model

    def inputs():
        x = (images.float() / 255 - mean) / std
        if kind == "pretrain":
            x = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        return x.contiguous(memory_format=layout)

    def step():
        loss = F.cross_entropy(net(inputs()), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def timed(step, count):
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def error_text(error):
    return f"{type(error).__name__}: {error}"[:2000]


def main():
    cfg = json.loads(sys.argv[1])
    steps, info = {}, {}
    for kind in cfg["kinds"]:
        for mode in cfg["modes"]:
            try:   # torch.compile needs a working C++ toolchain on CPU
                step = build_step(kind, mode, cfg["batch_size"])
                info[f"{kind}/{mode}"] = {"warmup_s": timed(step, max(cfg["warmup"], 1))}
                steps[kind, mode] = step
            except Exception as error:  # noqa: BLE001 - reported, the other cases still run
                traceback.print_exc()
                info[f"{kind}/{mode}"] = {"error": error_text(error)}
    print(READY + json.dumps({
        "torch_version": torch.__version__, "python": sys.version.split()[0],
        "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch_size": cfg["batch_size"], "cases": info}),
        flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        reply = {"kind": request["kind"], "mode": request["mode"]}
        try:
            step = steps[request["kind"], request["mode"]]
            timed(step, request.get("warmup", 0))
            reply["step_times_s"] = timed(step, request["steps"])
        except Exception as error:  # noqa: BLE001
            traceback.print_exc()
            reply["error"] = error_text(error)
        print(RESULT + json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
