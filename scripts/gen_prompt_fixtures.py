#!/usr/bin/env python3
"""Renders tests/fixtures/prompts/*.txt with Python's jinja2, configured the
way Hugging Face transformers renders chat templates. It is an independent
reference for the Rust renderer (minijinja); rerun it only when fixtures
change: python3 scripts/gen_prompt_fixtures.py (needs `pip install jinja2`)."""
import json
import pathlib

from jinja2.sandbox import ImmutableSandboxedEnvironment

root = pathlib.Path(__file__).resolve().parent.parent
fixtures = root / "tests/fixtures"


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render(template_path, messages, tools=None, **extra):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    template = env.from_string(pathlib.Path(template_path).read_text())
    messages = json.loads(json.dumps(messages))
    for message in messages:  # as llama.cpp does: arguments as objects
        for call in message.get("tool_calls") or []:
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return template.render(messages=messages, tools=tools, add_generation_prompt=True, bos_token="", eos_token="", **extra)


conversation = json.loads((fixtures / "prompts/conversation.json").read_text())
smollm2 = fixtures / "templates/smollm2.jinja"
qwen = fixtures / "templates/qwen2.5.jinja"
fallback = root / "runtime/src/model/templates/chatml_tools.jinja"
smol_default = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
outputs = {
    "smollm2_plain.txt": render(smollm2, conversation["plain"]),
    "smollm2_tools.txt": render(fallback, conversation["with_tools"], conversation["tools"], default_system=smol_default),
    "qwen25_plain.txt": render(qwen, conversation["plain"]),
    "qwen25_tools.txt": render(qwen, conversation["with_tools"], conversation["tools"]),
}
for name, text in outputs.items():
    (fixtures / "prompts" / name).write_text(text)
    print(f"wrote tests/fixtures/prompts/{name} ({len(text)} chars)")
