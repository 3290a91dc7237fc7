"""Publishes a trained and evaluated model as DeepSeg's bundled default model (``Resources/models/<id>/``).

The last step of the recipe in :mod:`.train` (from ``DeepSegModule/``)::

    python -m DeepSegModuleLib.training.train --output ../build/deepseg-brain ...
    python -m DeepSegModuleLib.training.evaluate --model ../build/deepseg-brain --record
    python -m DeepSegModuleLib.training.publish --model ../build/deepseg-brain

It copies the TorchScript weights and the model card (whose sha256 must match the weights), and the training
log and loss curve for the record, into the resources folder, then writes the store manifest with every file's
checksum, so the bundled model is verified like any imported one before it runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

from DeepSegModuleLib.models.store import DEFAULT_MODEL_ID, write_manifest
from DeepSegModuleLib.training.train import CARD_NAME, WEIGHTS_NAME

REPOSITORY = Path(__file__).resolve().parents[3]
DEFAULT_DESTINATION = REPOSITORY / "Resources" / "models" / DEFAULT_MODEL_ID
#: What is shipped besides the weights and the card: how they were made.
RECORDS = ("train.log", "loss.csv")


def publish(model: Path, destination: Path = DEFAULT_DESTINATION, model_id: str = DEFAULT_MODEL_ID) -> dict:
    """Copies a trained model folder's weights, card and training records to ``destination``; returns the manifest.

    Raises:
        FileNotFoundError: the folder lacks the weights or the card.
        ValueError: the card's sha256 is not the weights' (the card describes another export).
    """
    model, destination = Path(model), Path(destination)
    weights, card = model / WEIGHTS_NAME, model / CARD_NAME
    for path in (weights, card):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run DeepSegModuleLib.training.train first")
    recorded = json.loads(card.read_text(encoding="utf-8")).get("sha256")
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    if recorded != actual:
        raise ValueError(f"{card} records sha256 {recorded}, but {weights} has {actual}: export the model again")
    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    for name in (WEIGHTS_NAME, CARD_NAME, *RECORDS):
        if (model / name).is_file():
            shutil.copy2(model / name, destination / name)
    return write_manifest(destination, model_id, f"DeepSegModuleLib.training.train ({model.name})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the folder train wrote")
    parser.add_argument("--destination", type=Path, default=DEFAULT_DESTINATION)
    arguments = parser.parse_args(argv)
    manifest = publish(arguments.model, arguments.destination)
    print(json.dumps(manifest, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
