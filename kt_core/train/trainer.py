"""The optimisation loop of LoRA fine-tuning, with checkpoints that resume the same loss curve.

A checkpoint is a folder: ``state.safetensors`` (the adapters' A / B and AdamW's moments, tensors
only) and ``state.json`` (the step, the data order and position, the shuffling RNG's state, AdamW's
hyper-parameters and step counts): written beside, flushed to disk, then renamed into place
(runtime/folder_swap.py), so a crash or power cut at any point leaves the previous one or the new one.
Nothing is unpickled to resume.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Optional

import torch

from kt_core.errors import KtError
from kt_core.runtime.folder_swap import current, partial_of, swap_in

STEP_FN = Callable[[int, float, int], None]


class Trainer:
    def __init__(self, lora, examples: list, lr: float, batch: int = 1, seed: int = 0,
                 loss_fn: Optional[Callable] = None, packing: bool = False) -> None:
        """``loss_fn(example) -> (loss, info)``: an example's own mean loss (DPO's per pair; ``info`` is
        kept in ``infos``); default: supervised cross-entropy, a mean over the batch's answer tokens.
        ``packing``: a step's examples go through the model together, as sequences of one forward pass
        (fewer, larger products; the activations of all of them are held at once)."""
        from kt_core.train.sft import loss_of

        self.lora, self.examples, self.batch, self.loss_of = lora, examples, batch, loss_of
        self.packing = packing and loss_fn is None
        self.loss_fn, self.infos = loss_fn, []
        self.params = lora.parameters()
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.rng = random.Random(seed)
        self.order = list(range(len(examples)))
        self.rng.shuffle(self.order)
        self.at, self.step = 0, 0

    def _next(self):
        if self.at == len(self.order):
            self.rng.shuffle(self.order)
            self.at = 0
        self.at += 1
        return self.examples[self.order[self.at - 1]]

    def run(self, steps: int, on_step: Optional[STEP_FN] = None, save_every: int = 0,
            ckpt: Optional[Path] = None) -> list[float]:
        """Optimizer steps until ``steps`` in all (a resumed run continues its count); the loss of each
        step is the mean over the answer tokens of its ``batch`` examples (accumulated one at a time)."""
        losses = []
        while self.step < steps:
            self.opt.zero_grad(set_to_none=True)
            chosen = [self._next() for _ in range(self.batch)]
            total = len(chosen) if self.loss_fn is not None else \
                sum(len(ex.tokens) - max(ex.first_label, 1) for ex in chosen)
            step_loss, n_tok = 0.0, 0
            if self.packing:
                from kt_core.train.sft import packed_loss_of

                loss, _ = packed_loss_of(self.lora.model, chosen)
                (loss / max(total, 1)).backward()
                step_loss, n_tok = float(loss.detach()), sum(len(ex.tokens) for ex in chosen)
            for ex in chosen if not self.packing else []:
                if self.loss_fn is not None:
                    loss, info = self.loss_fn(ex)
                    self.infos.append(info)
                else:
                    loss, _ = self.loss_of(self.lora.model, ex)
                (loss / max(total, 1)).backward()
                step_loss += float(loss.detach())
                n_tok += len(ex.tokens)
            self.opt.step()
            self.step += 1
            losses.append(step_loss / max(total, 1))
            if on_step is not None:
                on_step(self.step - 1, losses[-1], n_tok)
            if ckpt is not None and save_every > 0 and self.step % save_every == 0:
                self.save(ckpt)
        return losses

    # ---- checkpoints ------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder = Path(folder)
        tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(self.params)}
        steps = {}
        for i, p in enumerate(self.params):
            st = self.opt.state.get(p, {})
            if st:
                tensors[f"opt.{i}.exp_avg"] = st["exp_avg"].cpu().contiguous()
                tensors[f"opt.{i}.exp_avg_sq"] = st["exp_avg_sq"].cpu().contiguous()
                steps[str(i)] = float(st["step"])
        version, internal, gauss = self.rng.getstate()
        meta = {"format": "kt-core-lora-train", "version": 1, "step": self.step, "order": self.order, "at": self.at,
                "rng": [version, list(internal), gauss], "adam_steps": steps,
                "lr": self.opt.param_groups[0]["lr"], "n_params": len(self.params)}
        tmp = partial_of(folder)
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"format": "pt"})
        (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
        swap_in(tmp, folder)

    def load(self, folder: Path) -> None:
        """Continue from a checkpoint written by ``save`` for the same adapters and data."""
        from safetensors.torch import load_file

        folder = current(Path(folder))  # a save cut between its renames left the checkpoint before it beside
        try:
            meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
            tensors = load_file(str(folder / "state.safetensors"))
            if not isinstance(meta, dict):
                raise ValueError("state.json is not an object")
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file, whatever its reader raises
            raise KtError(f"{folder} is not a readable kt sft checkpoint ({type(exc).__name__}: {exc}); start "
                          "without resume") from None
        if meta.get("format") != "kt-core-lora-train" or meta.get("n_params") != len(self.params) or \
                sorted(meta.get("order", [])) != list(range(len(self.examples))):
            raise KtError(f"{folder} was written for other adapters or other data; start without resume")
        for i, p in enumerate(self.params):  # the same adapters: each tensor's shape (train.lora.r) as this run's
            for key in (f"param.{i}", f"opt.{i}.exp_avg", f"opt.{i}.exp_avg_sq"):
                t = tensors.get(key)
                if (t is None and key.startswith("param")) or (t is not None and tuple(t.shape) != tuple(p.shape)):
                    got = "missing" if t is None else f"shaped {tuple(t.shape)}"
                    raise KtError(f"{folder}: {key} is {got} where this run's adapter is {tuple(p.shape)} (another "
                                  "train.lora.r or targets?); resume with the settings it was written with, or "
                                  "start without resume")
        at, step = meta.get("at"), meta.get("step")
        if not (isinstance(at, int) and 0 <= at <= len(self.examples) and isinstance(step, int) and step >= 0
                and isinstance(meta.get("adam_steps"), dict) and isinstance(meta.get("rng"), list)):
            raise KtError(f"{folder}/state.json is damaged (its step, data position or RNG state); start without "
                          "resume")
        with torch.no_grad():
            for i, p in enumerate(self.params):
                p.copy_(tensors[f"param.{i}"])
        for i, p in enumerate(self.params):
            if str(i) in meta["adam_steps"]:
                # copies: load_file's tensors map the file, which the next save renames away (on
                # Windows a mapped file cannot be renamed; anywhere, a file cut short under them faults)
                self.opt.state[p] = {"step": torch.tensor(meta["adam_steps"][str(i)]),
                                     "exp_avg": tensors[f"opt.{i}.exp_avg"].to(p.device, copy=True),
                                     "exp_avg_sq": tensors[f"opt.{i}.exp_avg_sq"].to(p.device, copy=True)}
        version, internal, gauss = meta["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order, self.at, self.step = list(meta["order"]), int(meta["at"]), int(meta["step"])
