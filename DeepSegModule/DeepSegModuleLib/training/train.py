"""Trains DeepSeg's default brain model from the MNI152 template with synthetic scans, and exports it.

One command (from ``DeepSegModule/``, with the project's environment) trains the shipped default model::

    python -m DeepSegModuleLib.training.train --recipe default --output ../build/deepseg-brain

then measure it on held-out real scans, write the figures into its card, and ship it::

    python -m DeepSegModuleLib.training.evaluate --model ../build/deepseg-brain --record
    python -m DeepSegModuleLib.training.publish --model ../build/deepseg-brain

The recipe (:data:`DEFAULT_RECIPE`) is four stages of this module's :func:`train`, each a plain single run that
can also be started on its own (``--iterations``, ``--seed``, ``--initial-weights``, ``--brain``, ...). Cost on
our 2-core AMD EPYC (AVX-512 BF16), bf16 mixed precision: with ``--threads 2`` about 0.45 s per iteration, so
4200 + 1600 + 1800 + 2000 iterations took 71.5 minutes (30.7 + 12.3 + 13.4 + 15.1); on one thread about 0.7 s
per iteration (a 96x112x96 sample: 0.2 s to generate, 0.5 s forward and backward), about two hours; float32
takes 0.9 s for the network alone. A GPU takes a fraction of that.

Every iteration draws a new synthetic scan (:mod:`.synth`) and takes one optimiser step; the loss of every
iteration goes to ``<output>/loss.csv`` and a summary line every ``--log-every`` iterations to
``<output>/train.log``. A checkpoint (weights only) is written every ``--checkpoint-every`` iterations. At the
end the network is exported as TorchScript with a DeepSeg model card (``deepseg.json``) into ``<output>``.

Reproducibility: ``--seed`` fixes the synthetic scans and the initial weights. The learning rate decays
polynomially over ``--iterations``; when ``--minutes`` is given and would end the run first, the decay follows
the elapsed time instead (so a capped run still anneals), and such a run depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from DeepSegModuleLib.labels import BRAIN_TERMS
from DeepSegModuleLib.training.data import TARGET_CLASSES, TemplateLabels, template_labels
from DeepSegModuleLib.training.synth import BrainSynth, SynthSettings

SPACING_MM = 2.0
#: Sliding-window size at inference: 192 x 224 x 192 mm, a whole adult head in one window.
PATCH_SIZE = (96, 112, 96)
WEIGHTS_NAME = "deepseg-brain.ts"
CARD_NAME = "deepseg.json"

LABELS = [
    {"value": 1, "name": "cerebrospinal fluid", "color": [0.55, 0.75, 0.95], "terms": "cerebrospinal fluid"},
    {"value": 2, "name": "grey matter", "color": [0.55, 0.55, 0.75], "terms": "grey matter"},
    {"value": 3, "name": "white matter", "color": [0.95, 0.92, 0.80], "terms": "white matter"},
]


def build_network() -> UNet:
    """The default model's network: a 5-level MONAI UNet, 4 classes (background, CSF, grey, white matter)."""
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=TARGET_CLASSES,
        channels=(8, 16, 32, 96, 320),
        strides=(2, 2, 2, 2),
        num_res_units=1,
        norm="instance",
    )


class BrainLoss(torch.nn.Module):
    """Dice + cross-entropy over the four classes, plus a soft Dice of the brain mask (CSF ∪ grey ∪ white),
    the figure the model is judged by."""

    def __init__(self) -> None:
        super().__init__()
        self.tissues = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tissues = self.tissues(logits, target)
        brain_probability = 1.0 - torch.softmax(logits, dim=1)[:, 0]
        brain = (target[:, 0] > 0).float()
        overlap = (brain_probability * brain).sum()
        brain_dice = (2 * overlap + 1.0) / (brain_probability.sum() + brain.sum() + 1.0)
        return tissues + (1.0 - brain_dice), brain_dice.detach()


def model_card(weights_name: str, sha256: str, figures: dict | None, training: dict) -> dict:
    """The DeepSeg model card of the exported network (see docs/model_card.md)."""
    measured = "; ".join(f"{name}: {value}" for name, value in figures.items()) if figures else "not measured yet"
    description = (
        "Brain tissue segmentation of a head scan of any contrast (T1, T2, FLAIR, PD; CT-like contrasts seen in "
        "training) at 2 mm: cerebrospinal fluid (ventricles, sulci and cisterns within the brain's surface, not the "
        "CSF between the brain and the skull), grey matter and white matter. The brain mask is the union of the "
        "three labels and ends at the brain's surface. Research demo, not for clinical use. "
        "Trained by DeepSeg (DeepSegModuleLib.training.train) only on synthetic scans generated from the "
        "MNI ICBM152 2009a nonlinear symmetric template and its grey/white matter maps as shipped by nilearn "
        "(CSF and the head derived from them, see DeepSegModuleLib/training/data.py); no patient data. "
        f"Training: {training}. "
        f"Measured brain-mask Dice on real scans it never saw (DeepSegModuleLib.training.evaluate): {measured}."
    )
    return {
        "deepseg_model_card": 1,
        "name": "DeepSeg brain tissues (any contrast, 2 mm)",
        "description": description,
        "version": "0.1.0",
        "license": (
            "Apache-2.0 (weights and code, DeepSeg). Training data: MNI ICBM152 2009a template, Copyright (C) "
            "1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill "
            "University, distributed under its permissive licence (use, copy, modify with the notice kept)."
        ),
        "authors": "DeepSeg",
        "weights": weights_name,
        "sha256": sha256,
        "inputs": [{"name": "head scan", "modality": "MR", "normalization": {"mode": "unit"}}],
        "orientation": "RAS",
        "spacing": [SPACING_MM] * 3,
        "patch_size": list(PATCH_SIZE),
        "overlap": 0.25,
        "activation": "softmax",
        "mirror_axes": [0],
        "axis_order": "ijk",
        "labels": [
            {
                "value": label["value"],
                "name": label["name"],
                "color": label["color"],
                "terminology": BRAIN_TERMS[label["terms"]].to_slicer_string(),
            }
            for label in LABELS
        ],
    }


def export(network: torch.nn.Module, output: Path, figures: dict | None = None, training: dict | None = None) -> Path:
    """Writes the network as TorchScript and its card into ``output``; returns the card's path."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    network = network.to("cpu").eval()
    with torch.no_grad():
        try:
            scripted = torch.jit.script(network)
        except Exception:  # noqa: BLE001 - some MONAI blocks do not script; tracing a UNet is shape-agnostic
            scripted = torch.jit.trace(network, torch.zeros(1, 1, *PATCH_SIZE))
    weights = output / WEIGHTS_NAME
    torch.jit.save(scripted, str(weights))
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    card = model_card(WEIGHTS_NAME, sha256, figures, training or {})
    card_path = output / CARD_NAME
    card_path.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card_path


def _step(network, optimizer, loss_function, generator, device: torch.device, precision: str) -> tuple[float, float]:
    """One optimiser step on a fresh synthetic scan; returns the loss and the brain Dice of that scan."""
    image, target = generator.sample()
    network.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = network(image[None].to(device))
    loss, brain_dice = loss_function(logits.float(), target[None].to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), float(brain_dice)


def _poly_rate(base: float, iteration: int, iterations: int, elapsed: float, budget_s: float | None) -> float:
    """nnU-Net's polynomial decay over the iterations, or over the time budget when that runs out first."""
    progress = (iteration - 1) / iterations
    if budget_s is not None:
        progress = max(progress, elapsed / budget_s)
    return base * (1.0 - min(progress, 0.99)) ** 0.9


class _Record:
    """Writes each iteration to ``loss.csv`` and the mean of the last ``every`` to ``train.log``."""

    def __init__(self, loss_file: Any, log: Any, started: float, every: int, iterations: int) -> None:
        self.loss_file, self.log, self.started, self.every, self.iterations = loss_file, log, started, every, iterations
        self.writer = csv.writer(loss_file)
        self.writer.writerow(["iteration", "seconds", "learning_rate", "loss", "brain_dice"])
        self.recent: list[tuple[float, float]] = []

    def __call__(self, iteration: int, learning_rate: float, loss: float, brain_dice: float) -> None:
        seconds = time.perf_counter() - self.started
        self.writer.writerow([iteration, f"{seconds:.1f}", f"{learning_rate:.6f}", f"{loss:.5f}", f"{brain_dice:.4f}"])
        self.recent = [*self.recent, (loss, brain_dice)][-self.every :]
        if iteration % self.every == 0 or iteration == self.iterations:
            self.loss_file.flush()
            mean_loss, mean_dice = np.mean(self.recent, axis=0)
            self.log.write(
                f"iteration {iteration} time {seconds:.0f}s lr {learning_rate:.5f} "
                f"loss {mean_loss:.4f} brain dice {mean_dice:.4f}\n"
            )
            self.log.flush()


def _header(output: Path, **settings) -> Any:
    """``train.log``, opened, with the run's settings as its first line."""
    log = (output / "train.log").open("w", encoding="utf-8")
    log.write(" ".join(f"{key}={value}" for key, value in settings.items()) + "\n")
    log.flush()
    return log


def train(
    output: Path,
    iterations: int = 900,
    minutes: float | None = None,
    seed: int = 0,
    crop: tuple[int, int, int] = PATCH_SIZE,
    learning_rate: float = 2e-3,
    threads: int | None = None,
    log_every: int = 10,
    checkpoint_every: int = 50,
    initial_weights: Path | None = None,
    template: TemplateLabels | None = None,
    random_contrast_probability: float = 0.5,
    precision: str = "fp32",
    layered_head_probability: float = 0.0,
    brain: str = "intracranial",
    outer_csf_like_csf_probability: float = 0.0,
    outer_csf_mm: tuple[float, float] | None = None,
) -> dict:
    """Runs the training loop and exports the model; returns a summary (iterations, time, last losses).

    Args:
        output: folder for the log, the checkpoint and the exported model.
        iterations: optimiser steps.
        minutes: wall-clock cap; the run stops (and exports) when it is reached.
        seed: seeds the synthetic scans and the initial weights.
        crop: training crop in 2 mm voxels (each side a multiple of 16). The default is the inference window:
            instance normalisation sees the same mix of brain, head and air as at inference. Smaller crops train
            faster but, in our runs, made the network label air and scalp as brain on whole real scans.
        learning_rate: initial AdamW learning rate.
        threads: torch CPU threads (None: torch's default).
        log_every: iterations between lines of ``train.log``.
        checkpoint_every: iterations between checkpoints.
        initial_weights: a checkpoint to start from instead of random weights.
        template: the generation labels (default: built from the MNI152 template at 2 mm).
        random_contrast_probability: share of samples with fully random tissue intensities (the rest use
            jittered T1, T2, FLAIR, PD and CT-like presets).
        layered_head_probability: share of synthetic heads painted in layers (meninges, skull tables and
            marrow, muscle and fat; see :class:`.synth.SynthSettings`).
        brain: what the network learns as brain: ``"intracranial"`` (everything inside the skull) or ``"hull"``
            (the brain up to its own surface; the CSF between it and the skull is not brain), see :mod:`.data`.
        outer_csf_like_csf_probability: share of samples whose outer CSF has the CSF's intensity.
        outer_csf_mm: thickness range (mm) of the painted outer CSF shell, plain and layered heads alike (None:
            the generator's defaults, thinner for plain heads); a wide range stands for atrophied brains.
        precision: ``fp32``, or ``bf16`` for mixed precision (bfloat16 autocast of the network on CPU or CUDA,
            loss and weights in float32): on a CPU with AVX-512 BF16 it nearly halves the time of an iteration.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    settings = SynthSettings(
        crop=tuple(crop),
        random_contrast_probability=random_contrast_probability,
        layered_head_probability=layered_head_probability,
        outer_csf_like_csf_probability=outer_csf_like_csf_probability,
    )
    if outer_csf_mm is not None:
        settings.outer_csf_mm = settings.layered_outer_csf_mm = tuple(float(v) for v in outer_csf_mm)
    generator = BrainSynth(template or template_labels(spacing=int(SPACING_MM), brain=brain), settings, seed=seed)
    network = build_network().to(device)
    if initial_weights is not None:
        network.load_state_dict(torch.load(initial_weights, map_location=device, weights_only=True))
    parameters = sum(p.numel() for p in network.parameters())
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=1e-5)
    loss_function = BrainLoss()
    budget_s = minutes * 60.0 if minutes else None

    log = _header(
        output, seed=seed, iterations=iterations, minutes=minutes, crop=list(crop), lr=learning_rate,
        random_contrast_probability=random_contrast_probability, initial_weights=initial_weights,
        layered_head_probability=layered_head_probability, brain=brain,
        outer_csf_like_csf_probability=outer_csf_like_csf_probability, outer_csf_mm=outer_csf_mm,
        precision=precision, parameters=parameters, device=device, threads=torch.get_num_threads(),
    )  # fmt: skip
    done = 0
    with (output / "loss.csv").open("w", newline="", encoding="utf-8") as loss_file:
        record = _Record(loss_file, log, started, log_every, iterations)
        loop_started = time.perf_counter()
        for iteration in range(1, iterations + 1):
            elapsed = time.perf_counter() - loop_started
            if budget_s is not None and elapsed >= budget_s:
                log.write(f"stopped by the {minutes} minute cap after {done} iterations\n")
                break
            learning_rate_now = _poly_rate(learning_rate, iteration, iterations, elapsed, budget_s)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_now
            value, brain_dice = _step(network, optimizer, loss_function, generator, device, precision)
            done = iteration
            if not np.isfinite(value):
                raise FloatingPointError(f"the loss became {value} at iteration {iteration}; lower --learning-rate")
            record(iteration, learning_rate_now, value, brain_dice)
            if iteration % checkpoint_every == 0:
                torch.save(network.state_dict(), output / "checkpoint.pt")
    torch.save(network.state_dict(), output / "checkpoint.pt")
    summary = {
        "iterations": done,
        "minutes": round((time.perf_counter() - started) / 60.0, 1),
        "seed": seed,
        "crop_voxels": list(crop),
        "parameters": parameters,
        "last_losses": [round(v, 4) for v, _ in record.recent],
        "last_brain_dice": [round(d, 4) for _, d in record.recent],
    }
    training = {key: summary[key] for key in ("iterations", "seed", "minutes", "parameters")}
    summary["card"] = str(export(network, output, training={**training, "device": str(device), "precision": precision}))
    log.write(json.dumps(summary) + "\n")
    log.close()
    return summary


#: The recipe of the shipped default model, three stages, each continuing from the previous one's weights:
#:
#: 1. from random weights, on the plain synthetic heads;
#: 2. half of the heads painted in layers (real T1s with bright meninges and marrow made the first stage's
#:    network take the skull for brain);
#: 3. the brain ends at its own surface (``brain="hull"``): the CSF between the brain and the skull, which the
#:    earlier stages counted as brain, is outer CSF, and mostly as bright or dark as the inner CSF (the second
#:    stage's network labelled a 5 mm band of it as grey matter on the seg3d T1, whose brain mask, like the
#:    stroke scans', ends at the brain's surface);
#: 4. the outer CSF of every head 0.5 to 8 mm thick (times a smooth variation), as in atrophied brains, so that
#:    the distance to the skull does not tell where the brain ends (after the third stage the network still
#:    took a 3 mm band of the seg3d T1's wide outer CSF for grey matter).
#:
#: Single-threaded, so the run is the same on any CPU with bf16; about 50 + 20 + 25 + 30 minutes on one core of
#: our 2-core machine. ``--threads 2`` takes 0.40 s per iteration there (about 65 minutes for the recipe), with
#: weights that differ from the single-threaded ones in rounding.
DEFAULT_RECIPE = (
    {"name": "stage1-plain-heads", "iterations": 4200, "seed": 0, "learning_rate": 2e-3},
    {"name": "stage2-layered-heads", "iterations": 1600, "seed": 1, "learning_rate": 1e-3,
     "layered_head_probability": 0.5},
    {"name": "stage3-tight-brain", "iterations": 1800, "seed": 2, "learning_rate": 1e-3,
     "layered_head_probability": 0.5, "brain": "hull", "outer_csf_like_csf_probability": 0.8},
    {"name": "stage4-wide-csf", "iterations": 2000, "seed": 3, "learning_rate": 5e-4,
     "layered_head_probability": 0.5, "brain": "hull", "outer_csf_like_csf_probability": 0.8,
     "outer_csf_mm": (0.5, 8.0)},
)  # fmt: skip


def train_recipe(output: Path, recipe=DEFAULT_RECIPE, threads: int | None = 1, precision: str = "bf16", **common) -> dict:
    """Runs the stages of ``recipe`` in turn, each starting from the previous stage's weights; the last stage's
    export (weights + card) is copied into ``output`` with every stage's log."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    previous: Path | None = None
    summaries = []
    for stage in recipe:
        settings = {key: value for key, value in stage.items() if key != "name"}
        folder = output / stage["name"]
        summary = train(
            folder, threads=threads, precision=precision, initial_weights=previous, **settings, **common
        )
        summaries.append({"stage": stage["name"], **summary})
        previous = folder / "checkpoint.pt"
    return {"stages": summaries, "training": assemble_recipe(output, recipe, threads, precision)}


def assemble_recipe(output: Path, recipe=DEFAULT_RECIPE, threads: int | None = 1, precision: str = "bf16") -> dict:
    """Exports the last stage of a finished recipe run into ``output`` with the stages' logs merged."""
    output = Path(output)
    last = output / recipe[-1]["name"]
    summaries = [json.loads((output / s["name"] / "train.log").read_text().splitlines()[-1]) for s in recipe]
    training = {
        "recipe": [dict(stage) for stage in recipe],
        "iterations": sum(summary["iterations"] for summary in summaries),
        "minutes": round(sum(summary["minutes"] for summary in summaries), 1),
        "precision": precision,
        "threads": threads,
        "parameters": summaries[-1]["parameters"],
    }
    network = build_network()
    network.load_state_dict(torch.load(last / "checkpoint.pt", map_location="cpu", weights_only=True))
    export(network, output, training=training)
    with (output / "train.log").open("w", encoding="utf-8") as log:
        for stage in recipe:
            log.write(f"== {stage['name']}\n" + (output / stage["name"] / "train.log").read_text(encoding="utf-8"))
    with (output / "loss.csv").open("w", encoding="utf-8") as merged:
        merged.write("stage,iteration,seconds,learning_rate,loss,brain_dice\n")
        for stage in recipe:
            rows = (output / stage["name"] / "loss.csv").read_text(encoding="utf-8").splitlines()[1:]
            merged.writelines(f"{stage['name']},{row}\n" for row in rows)
    return training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="folder for the log, checkpoint and model")
    parser.add_argument("--iterations", type=int, default=900)
    parser.add_argument("--minutes", type=float, default=None, help="wall-clock cap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crop", type=int, nargs=3, default=PATCH_SIZE, help="training crop, 2 mm voxels")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--initial-weights", type=Path, default=None, help="checkpoint to continue from")
    parser.add_argument("--random-contrast-probability", type=float, default=0.5)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: mixed precision")
    parser.add_argument("--layered-head-probability", type=float, default=0.0)
    parser.add_argument("--brain", choices=("intracranial", "hull"), default="intracranial", help="what is brain")
    parser.add_argument("--outer-csf-like-csf-probability", type=float, default=0.0)
    parser.add_argument("--outer-csf-mm", type=float, nargs=2, default=None, help="outer CSF thickness range")
    parser.add_argument(
        "--recipe", choices=("default",), default=None,
        help="run the shipped model's whole recipe (DEFAULT_RECIPE, bf16, one thread unless --threads); other "
        "options ignored",
    )
    arguments = parser.parse_args(argv)
    if arguments.recipe == "default":
        print(json.dumps(train_recipe(arguments.output, threads=arguments.threads or 1), indent=2))
        return 0
    summary = train(
        arguments.output,
        iterations=arguments.iterations,
        minutes=arguments.minutes,
        seed=arguments.seed,
        crop=tuple(arguments.crop),
        learning_rate=arguments.learning_rate,
        threads=arguments.threads,
        log_every=arguments.log_every,
        checkpoint_every=arguments.checkpoint_every,
        initial_weights=arguments.initial_weights,
        random_contrast_probability=arguments.random_contrast_probability,
        precision=arguments.precision,
        layered_head_probability=arguments.layered_head_probability,
        brain=arguments.brain,
        outer_csf_like_csf_probability=arguments.outer_csf_like_csf_probability,
        outer_csf_mm=arguments.outer_csf_mm,
    )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
