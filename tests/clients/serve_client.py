"""Drives `agent serve` with real clients: the official OpenAI Python SDK
(`openai` on PyPI) for the model API, and httpx2 for the session API.

Called by tests/serve.rs, one scenario per run:

    serve_client.py SCENARIO BASE_URL TOKEN [ARG...]

It prints one JSON object of what it observed; the Rust test asserts on it.
The script itself asserts nothing, so a failure shows the observation.
"""

from __future__ import annotations

import base64
import json
import sys
import threading

import httpx2
import jsonschema
import openai

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def check_call(name: str, arguments: str) -> dict:
    """Whether a call's arguments parse and follow its tool's schema."""
    seen = {"name": name, "arguments": arguments, "known": name in SCHEMAS}
    try:
        parsed = json.loads(arguments)
        seen["json"] = True
    except ValueError:
        seen["json"] = False
        seen["valid"] = False
        return seen
    try:
        jsonschema.validate(parsed, SCHEMAS.get(name, {"not": {}}))
        seen["valid"] = True
    except jsonschema.ValidationError as err:
        seen["valid"] = False
        seen["why"] = err.message
    return seen


def failure(err: Exception) -> dict:
    return {
        "status": getattr(err, "status_code", None),
        "message": str(getattr(err, "message", err)),
        "kind": type(err).__name__,
    }


def scenario_openai(base: str, token: str) -> dict:
    client = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
    seen: dict = {}
    seen["models"] = [m.id for m in client.models.list().data]
    model = seen["models"][0]
    user = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]

    plain = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
    )
    seen["plain"] = {
        "content": plain.choices[0].message.content,
        "finish_reason": plain.choices[0].finish_reason,
        "usage": plain.usage.model_dump() if plain.usage else None,
    }

    streamed = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in streamed:
        if chunk.usage:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    seen["streamed"] = {"pieces": len(pieces), "content": "".join(pieces), "finish_reason": finish, "usage": usage}

    calls = []
    # "auto" last: the routing step (see `--routing`) names get_weather,
    # in a batched slot of the server's context.
    for choice in ["required", {"type": "function", "function": {"name": "get_time"}}, "auto"]:
        answer = client.chat.completions.create(
            model=model, messages=user, tools=TOOLS, tool_choice=choice, temperature=0
        )
        message = answer.choices[0].message
        calls.append({
            "choice": choice,
            "finish_reason": answer.choices[0].finish_reason,
            "calls": [check_call(c.function.name, c.function.arguments) for c in message.tool_calls or []],
            "ids": [c.id for c in message.tool_calls or []],
            "usage": answer.usage.model_dump() if answer.usage else None,
        })
    seen["tool_calls"] = calls

    stream = client.chat.completions.create(
        model=model, messages=user, tools=TOOLS, tool_choice="required", temperature=0, stream=True
    )
    assembled: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                slot = assembled.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function and delta.function.name:
                    slot["name"] += delta.function.name
                if delta.function and delta.function.arguments:
                    slot["arguments"] += delta.function.arguments
    seen["streamed_tool_calls"] = {
        "finish_reason": finish,
        "calls": [check_call(c["name"], c["arguments"]) for c in assembled.values()],
    }

    # The conversation goes on with the tool's result, as an agent would.
    first = calls[0]
    if first["calls"]:
        followed = client.chat.completions.create(
            model=model,
            messages=user
            + [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{
                        "id": first["ids"][0],
                        "type": "function",
                        "function": {"name": first["calls"][0]["name"], "arguments": first["calls"][0]["arguments"]},
                    }],
                },
                {"role": "tool", "tool_call_id": first["ids"][0], "content": "18 degrees and sunny"},
            ],
            tools=TOOLS,
            tool_choice="none",
            max_tokens=32,
            temperature=0,
        )
        seen["followed"] = {
            "content": followed.choices[0].message.content,
            "tool_calls": followed.choices[0].message.tool_calls,
        }

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}, "celsius": {"type": "integer"}},
        "required": ["city", "celsius"],
        "additionalProperties": False,
    }
    shaped = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give the temperature in Paris as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}},
        max_tokens=64,
        temperature=0,
    )
    text = shaped.choices[0].message.content
    try:
        jsonschema.validate(json.loads(text), schema)
        seen["json_schema_valid"] = True
    except (ValueError, jsonschema.ValidationError) as err:
        seen["json_schema_valid"] = False
        seen["json_schema_why"] = str(err)
    seen["json_schema_text"] = text

    errors = {}
    for name, call in {
        "unknown_field": lambda: client.chat.completions.create(model=model, messages=user, extra_body={"temprature": 1}),
        "bad_tool_choice": lambda: client.chat.completions.create(model=model, messages=user, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
        "empty_messages": lambda: client.chat.completions.create(model=model, messages=[]),
        "two_choices": lambda: client.chat.completions.create(model=model, messages=user, n=2),
    }.items():
        try:
            call()
            errors[name] = None
        except openai.APIStatusError as err:
            errors[name] = failure(err)
    wrong = openai.OpenAI(base_url=base + "/v1", api_key="not-the-token-at-all", max_retries=0)
    try:
        wrong.models.list()
        errors["wrong_token"] = None
    except openai.APIStatusError as err:
        errors["wrong_token"] = failure(err)
    seen["errors"] = errors
    return seen


class Sessions:
    """The session API over httpx2."""

    def __init__(self, base: str, token: str):
        self.base = base
        self.http = httpx2.Client(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=600
        )

    def create(self, **body) -> tuple[int, dict]:
        r = self.http.post("/v1/sessions", json=body)
        return r.status_code, r.json()

    def turn(
        self, sid: str, message: str | None, approve: str | None = None, audio: bytes | None = None
    ) -> list[dict]:
        """Runs a turn (typed, or spoken: `audio` is a WAV clip), answering
        each approval with `approve` from another connection while the
        stream is open; returns the events (tokens folded into one count)."""
        events: list[dict] = []
        tokens = 0
        body: dict = {"message": message}
        if audio is not None:
            body = {"audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}}
        with self.http.stream("POST", f"/v1/sessions/{sid}/turns", json=body) as r:
            if r.status_code != 200:
                r.read()
                return [{"event": "http_error", "status": r.status_code, "body": r.json()}]
            name = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    name = line[len("event:"):].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[len("data:"):])
                    if name == "token":
                        tokens += 1
                        continue
                    events.append(data)
                    if name == "approval_needed" and approve:
                        call_id = data["request"]["call_id"]
                        answered = self.http.post(
                            f"/v1/sessions/{sid}/approvals/{call_id}", json={"answer": approve}
                        )
                        events.append({"event": "answered", "status": answered.status_code})
        events.append({"event": "tokens", "count": tokens})
        return events


def scenario_sessions(base: str, token: str, workspace: str) -> dict:
    api = Sessions(base, token)
    seen: dict = {}
    status, created = api.create(
        workspace=workspace, tool_choice="write_file", max_steps=1, temperature=0, max_tokens=96
    )
    seen["created"] = {"status": status, "body": created}
    sid = created["id"]
    seen["turn"] = api.turn(sid, "Write the word hello to the file hello.txt", approve="yes")
    shown = api.http.get(f"/v1/sessions/{sid}")
    seen["shown"] = {"status": shown.status_code, "body": shown.json()}
    refused = api.http.get(f"/v1/sessions/{sid}/export")
    seen["export_without_consent"] = {"status": refused.status_code, "body": refused.json()}
    consent = api.http.post(f"/v1/sessions/{sid}/training", json={"allowed": True})
    seen["training"] = {"status": consent.status_code, "body": consent.json()}
    exported = api.http.get(f"/v1/sessions/{sid}/export")
    seen["export"] = {"status": exported.status_code, "lines": exported.text.splitlines()}
    seen["busy_second_turn"] = None
    deleted = api.http.delete(f"/v1/sessions/{sid}")
    seen["deleted"] = {"status": deleted.status_code, "body": deleted.json()}
    gone = api.http.get(f"/v1/sessions/{sid}")
    seen["after_delete"] = {"status": gone.status_code, "body": gone.json()}
    status, resumed = api.create(workspace=workspace, resume=sid, tool_choice="none", max_tokens=24)
    seen["resumed"] = {"status": status, "body": resumed}
    if status == 201:
        seen["resumed_turn"] = api.turn(sid, "Thanks. What did you just do?")
        api.http.delete(f"/v1/sessions/{sid}")
    # A refused approval: the call does not run.
    status, other = api.create(workspace=workspace, tool_choice="write_file", max_steps=1, temperature=0, max_tokens=96)
    seen["declined_turn"] = api.turn(other["id"], "Write the word bye to the file bye.txt", approve="no")
    listed = api.http.get("/v1/sessions")
    seen["listed"] = {"status": listed.status_code, "body": listed.json()}
    erased = api.http.delete(f"/v1/sessions/{other['id']}", params={"erase": "true"})
    seen["erased"] = {"status": erased.status_code, "body": erased.json(), "id": other["id"]}
    metrics = api.http.get("/metrics")
    seen["metrics"] = {"status": metrics.status_code, "text": metrics.text}
    return seen


def scenario_load(base: str, token: str, workspaces_json: str, turns: str) -> dict:
    """Sessions in parallel threads, each in its own workspace with its own
    marker file, each running `turns` turns whose first step lists its
    workspace (the server's `workspace_files` tool, approved here)."""
    workspaces = json.loads(workspaces_json)
    results: dict[str, dict] = {}

    def one(workspace: str) -> None:
        api = Sessions(base, token)
        status, created = api.create(
            workspace=workspace, tool_choice="workspace_files", max_steps=2, temperature=0, max_tokens=32
        )
        record = {"status": status, "created": created, "turns": []}
        results[workspace] = record
        if status != 201:
            return
        sid = created["id"]
        for n in range(int(turns)):
            events = api.turn(sid, f"Which files are in the workspace? (turn {n})", approve="yes")
            record["turns"].append(events)
        shown = api.http.get(f"/v1/sessions/{sid}").json()
        record["messages"] = shown.get("messages")
        api.http.post(f"/v1/sessions/{sid}/training", json={"allowed": True})
        exported = api.http.get(f"/v1/sessions/{sid}/export")
        record["export_lines"] = len(exported.text.splitlines())
        api.http.delete(f"/v1/sessions/{sid}")

    threads = [threading.Thread(target=one, args=(w,)) for w in workspaces]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"sessions": results}


def scenario_speech(base: str, token: str, clip: str, workspace: str) -> dict:
    """Spoken input: OpenAI's transcription API through the official
    client (json, text and verbose_json; a file that is not WAV), then a
    session turn whose `audio` is the same clip."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=token, max_retries=0)
    seen: dict = {}
    with open(clip, "rb") as f:
        seen["json"] = client.audio.transcriptions.create(model="whisper-1", file=f).text
    with open(clip, "rb") as f:
        seen["text"] = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="text"
        )
    with open(clip, "rb") as f:
        verbose = client.audio.transcriptions.create(
            model="whisper-1", file=f, response_format="verbose_json"
        )
        seen["verbose"] = {"language": verbose.language, "duration": verbose.duration}
    try:
        client.audio.transcriptions.create(
            model="whisper-1", file=("notes.wav", b"this is not audio", "audio/wav")
        )
        seen["not_wav"] = {"status": 200}
    except openai.APIStatusError as err:
        seen["not_wav"] = failure(err)
    try:
        with open(clip, "rb") as f:
            client.audio.transcriptions.create(model="whisper-1", file=f, language="transcribe")
        seen["language"] = {"status": 200}
    except openai.APIStatusError as err:
        seen["language"] = failure(err)
    with open(clip, "rb") as f:
        seen["language_en"] = client.audio.transcriptions.create(
            model="whisper-1", file=f, language="EN"
        ).text
    try:
        with open(clip, "rb") as f:
            client.audio.transcriptions.create(model="whisper-1", file=f, prompt="spell it")
        seen["prompt"] = {"status": 200}
    except openai.APIStatusError as err:
        seen["prompt"] = failure(err)

    api = Sessions(base, token)
    status, created = api.create(workspace=workspace, tool_choice="list_dir", max_steps=2, temperature=0, max_tokens=96)
    seen["created"] = status
    if status == 201:
        with open(clip, "rb") as f:
            seen["turn"] = api.turn(created["id"], None, approve="yes", audio=f.read())
        seen["bad_turn"] = api.turn(created["id"], None, audio=b"RIFF\x10\x00\x00\x00WAVEfmt ")
        seen["after"] = api.turn(created["id"], "Which files are in the workspace?", approve="yes")
    return seen


def main() -> None:
    scenario, base, token, *rest = sys.argv[1:]
    run = {
        "openai": scenario_openai,
        "sessions": scenario_sessions,
        "load": scenario_load,
        "speech": scenario_speech,
    }[scenario]
    print(json.dumps(run(base, token, *rest), default=str))


if __name__ == "__main__":
    main()
