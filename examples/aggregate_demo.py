"""Demo of `fedlora aggregate` on real PEFT adapters (all-MiniLM-L6-v2, offline).

Three clients fine-tune LoRA (r=4 on query/value) for a few steps on their own toy sentiment
data and save their adapters with PEFT. The server aggregates them with several methods; each
result is loaded back with ``PeftModel.from_pretrained`` (+ the backbone delta) and compared with
the ideal update ``W + s * sum_i p_i B_i A_i`` on held-out inputs.

    python examples/aggregate_demo.py [--out demo]
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fedlora.cli import main as fedlora
from fedlora.lowrank import lora_scale
from fedlora.model.adapter_io import load_deltas, read_adapter
from fedlora.model.backbone import apply_backbone_delta, target_weight
from fedlora.model.loading import load_model, load_tokenizer

GOOD = ["great", "lovely", "excellent", "wonderful", "superb", "fine", "brilliant"]
BAD = ["awful", "terrible", "poor", "dreadful", "horrible", "bad", "boring"]
TOPICS = [["film", "movie", "plot"], ["meal", "soup", "service"], ["phone", "battery", "screen"]]


def client_data(c: int, n: int = 32, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 100 + c)
    texts, labels = [], []
    for _ in range(n):
        y = int(torch.randint(2, (1,), generator=gen))
        word = (GOOD if y else BAD)[int(torch.randint(7, (1,), generator=gen))]
        topic = TOPICS[c][int(torch.randint(3, (1,), generator=gen))]
        texts.append(f"the {topic} was {word}")
        labels.append(y)
    return texts, torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="working folder (replaced)")
    args = parser.parse_args()
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    torch.manual_seed(0)
    tok = load_tokenizer("offline:minilm")
    base = load_model("offline:minilm", "seq_cls", num_labels=2)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = get_peft_model(copy.deepcopy(base), cfg)
    model.save_pretrained(root / "global")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    sizes = [16, 32, 48]
    for c, n in enumerate(sizes):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in start:
                    p.copy_(start[name])
        texts, labels = client_data(c, n)
        batch = tok(texts, return_tensors="pt", padding=True)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for _ in range(15):
            loss = model(**batch, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"client {c}: {n} examples, final train loss {loss.item():.3f}")
        model.save_pretrained(root / f"client{c}")

    clients = [root / f"client{c}" for c in range(3)]
    probe = tok([f"the {t[0]} was {w}" for t in TOPICS for w in ("great", "awful")], return_tensors="pt", padding=True)

    ideal = copy.deepcopy(base)
    adapters = [read_adapter(d) for d in clients]
    p = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    for m in adapters[0].factors:
        dense = sum(pi * a.factors[m].B.double() @ a.factors[m].A.double() for pi, a in zip(p, adapters))
        weight, _ = target_weight(ideal, m)
        weight.data += (lora_scale(8, 4) * dense).to(weight.dtype)
    # the ideal model has no trained classifier head: give it the averaged one the methods use
    for name, param in ideal.named_parameters():
        key = f"base_model.model.{name}"
        if key in adapters[0].extras:
            param.data = sum(pi * a.extras[key].double() for pi, a in zip(p, adapters)).to(param.dtype)
    ideal.eval()
    with torch.no_grad():
        want = ideal(**probe).logits

    print(f"\n{'method':<16}{'max |logit - ideal|':>22}   backbone delta")
    for method, extra in [
        ("fedit", []),
        ("fedrot_lora", []),
        ("fedex_lora", []),
        ("flora", []),
        ("fedmomentum", ["--set", "tau=1"]),
    ]:
        out = root / f"global-{method}"
        weights = [str(n) for n in sizes]
        fedlora(
            [
                "aggregate",
                "--method",
                method,
                *map(str, clients),
                "--weights",
                *weights,
                "--global",
                str(root / "global"),
                "--out",
                str(out),
                *extra,
            ]
        )
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), str(out))
        delta_file = out / "backbone_delta.safetensors"
        if delta_file.exists():
            apply_backbone_delta(loaded, load_deltas(delta_file))
        loaded.eval()
        with torch.no_grad():
            got = loaded(**probe).logits
        err = (got - want).abs().max().item()
        print(f"{method:<16}{err:>22.2e}   {'yes' if delta_file.exists() else 'no'}")
    print(f"\nadapters and results in {root}/")


if __name__ == "__main__":
    main()
