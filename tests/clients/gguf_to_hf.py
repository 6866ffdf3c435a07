"""The default GGUF (SmolLM2-135M-Instruct, Q4_1) as a Hugging Face folder,
for vLLM's CPU build, which does not run GGUF quantizations: the weights
dequantized to bfloat16 (the same numbers llama.cpp computes with, widened),
the tokenizer and the chat template read from the GGUF itself.

    python gguf_to_hf.py MODEL.gguf OUT_DIR

Run by `scripts/setup --vllm` in the vLLM venv (transformers, gguf,
accelerate). Written to OUT_DIR.partial and moved into place last, so an
interrupted run leaves nothing that looks finished.
"""

import os
import shutil
import sys

import gguf
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    source, out = sys.argv[1], sys.argv[2]
    folder, name = os.path.dirname(os.path.abspath(source)), os.path.basename(source)
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    template = gguf.GGUFReader(source).fields.get("tokenizer.chat_template")
    if template is None:
        sys.exit(f"{source}: no tokenizer.chat_template in the GGUF")
    tokenizer.chat_template = bytes(template.parts[template.data[0]]).decode()

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="bfloat16")
    # transformers will not save a model it loaded from GGUF; its weights,
    # dequantized, are saved by hand (the tied output embedding once).
    state = {key: value.detach().contiguous().clone() for key, value in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(partial)
    tokenizer.save_pretrained(partial)

    shutil.rmtree(out, ignore_errors=True)
    os.rename(partial, out)
    print(f"{out}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main()
