"""Open weights (notebook 11): the course's model out to Hugging Face `transformers`, and open MoE
checkpoints in, with the same logits.

    tokenizer       the character tokenizer as a `tokenizers` tokenizer.json
    rope            the interleaved and half RoPE layouts and the row permutation between them
    architectures   which transformers class holds a moe_lab model exactly; config.json; the refusals
    mapping         each moe_lab tensor and its transformers name, both ways
    model_card      the README.md of an export
    export          export(model or checkpoint, DIR) and the command `python -m moe_lab export`
    importer        from_transformers(folder or model) -> a moe_lab Transformer

Needs the optional `hub` extra (transformers, tokenizers); the rest of the course does not.
"""
from moe_lab.open_weights.architectures import ARCHITECTURES, NoCounterpart, choose_architecture
from moe_lab.open_weights.export import OutputDirError, check_output_dir, export
from moe_lab.open_weights.importer import from_transformers

__all__ = ["ARCHITECTURES", "NoCounterpart", "OutputDirError", "check_output_dir", "choose_architecture", "export",
           "from_transformers"]
