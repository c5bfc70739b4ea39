"""Chat data for tests on the tiny chat Llama: two-exchange conversations, prepared as a chat task.

    from chat_helpers import chat_rows, prepare_chat
    prepared = prepare_chat(tmp_path, chat_rows(16, "thanks {i}"), chat_llama_dir, "chat_e2e", test_size=3)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def chat_rows(n: int, last_reply: str = "thanks {i} dollars") -> list[dict]:
    """Two-exchange conversations whose replies depend on the number asked about (`last_reply` holds
    `{i}`)."""
    return [{"messages": [
        {"role": "user", "content": f"book a table for {i} people"},
        {"role": "assistant", "content": "agreed see you soon"},
        {"role": "user", "content": f"the price is {i} dollars"},
        {"role": "assistant", "content": last_reply.format(i=i)},
    ]} for i in range(n)]


def prepare_chat(root: Path, rows: list[dict], tokenizer_dir: Path, name: str, test_size: int) -> Any:
    """`rows` written to `root/chat.jsonl` and prepared as a chat task (system prompt "be brief") into
    `root/data`; returns `prepare`'s result."""
    from lora_pipeline.data import DataConfig, prepare

    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return prepare(DataConfig(
        name=name, source="files", files={"train": str(root / "chat.jsonl")}, prompt_format="chat",
        messages_column="messages", system_prompt="be brief", tokenizer=str(tokenizer_dir),
        output_root=str(root / "data"), max_source_length=96, max_target_length=16,
        validation_size=2, test_size=test_size,
    ))
