"""auxtl's small_cnn rotation pretraining step in PyTorch (eager and torch.compile)."""
import json, statistics, sys, time
import torch
import torch.nn as nn
import torch.nn.functional as F

cfg = json.loads(sys.argv[1])
torch.manual_seed(0)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
B, steps, warmup = cfg["batch_size"], cfg["steps"], cfg["warmup"]


def block(i, o):  # conv3x3 (no bias) -> BN -> ReLU, as auxtl's ConvBlock
    return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o, momentum=0.1),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):  # conv 32-32, pool, 64-64, pool, 128, GAP, dense 128, head 4
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(*block(1, 32), *block(32, 32), nn.MaxPool2d(2),
                                      *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
                                      *block(64, 128))
        self.fc = nn.Linear(128, 128)
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc(self.features(x).mean((2, 3)))))


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(mode):
    torch.manual_seed(0)
    model = SmallCNN().to(device).to(memory_format=torch.channels_last)
    decay = [p for p in model.parameters() if p.ndim > 1]
    other = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4},
                           {"params": other, "weight_decay": 0.0}],
                          lr=0.05, momentum=0.9, nesterov=True)
    net = torch.compile(model) if mode == "compile" else model
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, 1, 28, 28), dtype=torch.uint8, generator=gen).to(device)
    x01 = images.float() / 255
    mean, std = x01.mean(), x01.std(unbiased=False)
    labels = torch.arange(4, device=device).repeat_interleave(B)

    def step():
        x = (images.float() / 255 - mean) / std
        x = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(4)])
        x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(net(x), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    start = time.perf_counter()
    step(); sync()
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(); sync()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"step_time_median_s": median, "step_time_min_s": min(times),
            "step_time_max_s": max(times), "step_times_s": times, "first_step_s": first,
            "examples_per_s": 4 * B / median}


out = {"torch_version": torch.__version__, "device": str(device),
       "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
       "threads": torch.get_num_threads(), "python": sys.version.split()[0],
       "batch_size": B, "examples_per_step": 4 * B, "modes": {}}
for mode in cfg["modes"]:
    try:
        out["modes"][mode] = run(mode)
    except Exception as error:  # torch.compile needs a working C++ toolchain on CPU
        out["modes"][mode] = {"error": f"{type(error).__name__}: {error}"[:2000]}
print("AUXTL_TORCH_JSON " + json.dumps(out))
