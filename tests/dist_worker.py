"""One rank of the distributed tests (run by tests/test_distributed.py through torch.distributed.run).

Builds a small attention block, the same on every rank, computes its unsharded output, then
shards it (tensor parallel over heads, or FSDP2), compiles with attnopt and checks the output.
Prints one RESULT line of JSON per rank.
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import attnopt
from attnopt.metrics import compare


class Attention(nn.Module):
    def __init__(self, dim=64, head_dim=16):
        super().__init__()
        self.hd = head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, -1, self.hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # local heads under TP
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    def __init__(self, dim=64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def main(mode: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 77, 64)
    with torch.no_grad():
        ref = model(x)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if mode == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model.attn, mesh, {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(),
                                              "o": RowwiseParallel()})
    else:
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.attn, mesh=mesh)
        fully_shard(model, mesh=mesh)
    be = attnopt.backend({"attention": {"min_seq_len": 0, "allow_fp32": True}})
    with torch.no_grad():
        out = torch.compile(model, backend=be)(x)
    out = out.full_tensor() if hasattr(out, "full_tensor") else out
    sites = [s for s in be.recorder.sites() if s.kind == "attention"]
    print("RESULT " + json.dumps({
        "rank": rank, "rel_l1": compare(out, ref)["rel_l1"],
        "sites": [{"status": s.status, "reason": s.reason, "q_heads": s.details.get("q_heads")} for s in sites],
    }), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
