"""Export a moe_lab model (or checkpoint) to a directory that `transformers` loads with no custom code.

    from moe_lab.open_weights import export
    export("data/checkpoints/moe_cpu.safetensors", "out/moe-lab-moe")
    python -m moe_lab export CHECKPOINT DIR

The directory holds config.json, model.safetensors (float32, per-expert tensors
`model.layers.i.mlp.experts.e.{gate,up,down}_proj.weight`, the names transformers 4.x and 5.x both load),
generation_config.json (greedy, stops at the newline that ends an answer), the tokenizer
(tokenizer.json, moe_lab.open_weights.tokenizer) and README.md, a model card. The architecture is the
one that computes exactly what the model does (moe_lab.open_weights.architectures); a model without
one is refused before anything is written, as is a DIR that is a file, is not empty or is read-only.

Publishing is one call, not run by the course (it needs an account and a token):

    from huggingface_hub import HfApi
    HfApi(token="hf_...").upload_folder(folder_path=DIR, repo_id="YOUR_NAME/moe-lab-moe", repo_type="model")
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union


from moe_lab.data.tokenizer import TOKENIZER
from moe_lab.open_weights.architectures import NoCounterpart, choose_architecture, hf_config
from moe_lab.open_weights.mapping import to_hf_tensors
from moe_lab.open_weights.model_card import model_card
from moe_lab.open_weights.tokenizer import save_tokenizer
from moe_lab.training.checkpoint import load_checkpoint, read_checkpoint


class OutputDirError(ValueError):
    """The output directory cannot be written: the message names it and why."""


def check_output_dir(directory: Union[str, Path]) -> Path:
    """The directory to export into, checked before any work: absent (it will be made), or an empty,
    writable folder. Anything else raises OutputDirError naming the path and the cause."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output directory {path}: is a file, expected a folder (absent or empty)")
    if path.is_dir():
        if any(path.iterdir()):
            raise OutputDirError(f"output directory {path}: is not empty ({len(list(path.iterdir()))} entries); "
                                 f"export never overwrites: choose a new or empty folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputDirError(f"output directory {path}: is read-only")
        return path
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise OutputDirError(f"output directory {path}: {parent} is a file, so no folder can be made there")
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"output directory {path}: its parent {parent} is read-only")
    return path


def _load(model_or_path):
    """(model, extra figures) from a moe_lab Transformer or a checkpoint path."""
    if isinstance(model_or_path, (str, Path)):
        return load_checkpoint(model_or_path)
    if not hasattr(model_or_path, "cfg") or not hasattr(model_or_path, "moe_layers"):
        raise TypeError(f"export(model_or_path={type(model_or_path).__name__}): expected a moe_lab Transformer or the "
                        f"path of a moe_lab checkpoint")
    return model_or_path, {}


def generation_config() -> dict:
    """Greedy decoding that stops at the newline ending an answer (or at <eos>), as moe_lab's evaluation does."""
    return {"do_sample": False, "eos_token_id": [TOKENIZER.newline_id, TOKENIZER.eos_id],
            "pad_token_id": TOKENIZER.pad_id, "bos_token_id": TOKENIZER.bos_id}


def export(model_or_path, directory: Union[str, Path], extra: Optional[dict] = None,
           repo_id: str = "YOUR_NAME/moe-lab-moe") -> Path:
    """Write `model_or_path` (a moe_lab Transformer or a checkpoint path) into `directory` for transformers.

    Checks come first (the directory, then the architecture: NoCounterpart names the field that has no
    exact counterpart), so a refused export writes nothing. `extra`: figures for the model card (a
    checkpoint's own metadata is used when a path is given). Returns the directory."""
    from safetensors.torch import save_file

    path = check_output_dir(directory)
    if isinstance(model_or_path, (str, Path)):
        choose_architecture(read_checkpoint(model_or_path)[0])  # refuse before building anything
    model, figures = _load(model_or_path)
    arch = choose_architecture(model.cfg)
    figures = {**figures, **(extra or {})}
    tensors = to_hf_tensors(model, arch)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(model.cfg, arch), indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config(), indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(path)
    card = model_card(model.cfg, arch, figures, model.n_params(), model.n_params(active=True), repo_id)
    (path / "README.md").write_text(card)
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """python -m moe_lab export CHECKPOINT DIR: export a checkpoint; errors exit 2 with the reason."""
    parser = argparse.ArgumentParser(prog="python -m moe_lab export",
                                     description="Export a moe_lab checkpoint to a Hugging Face transformers folder "
                                                 "(config.json, model.safetensors, tokenizer, model card).")
    parser.add_argument("checkpoint", help="a moe_lab checkpoint (.safetensors), e.g. data/checkpoints/moe_cpu.safetensors")
    parser.add_argument("directory", help="the folder to write: absent or empty")
    parser.add_argument("--repo-id", default="YOUR_NAME/moe-lab-moe", help="the Hub name the model card's example uses")
    args = parser.parse_args(argv)
    try:
        check_output_dir(args.directory)
        if not Path(args.checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {args.checkpoint}: no such file")
        out = export(args.checkpoint, args.directory, repo_id=args.repo_id)
    except ImportError as exc:
        parser.exit(2, f"error: {exc} (install the extra: pip install 'moe-lab[hub]')\n")
    except (OSError, ValueError, NoCounterpart) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
