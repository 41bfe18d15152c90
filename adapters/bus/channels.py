"""Channel names, and how Kafka maps a channel with a trailing id onto a topic and a message key."""

from __future__ import annotations

KEYED_PREFIXES = ("forseti.jobs.", "forseti.env.", "forseti.infer.")
"""Channels whose last part is an id: on Kafka the prefix is the topic and the id is the key."""

TASKS_PREFIX = "forseti.tasks."
"""Task channels, which every transport stores durably."""


def is_task_channel(channel: str) -> bool:
    """True for `forseti.tasks.<kind>`."""
    return channel.startswith(TASKS_PREFIX)


def topic_and_key(channel: str) -> tuple[str, str | None]:
    """The Kafka topic and key for a channel; a key of None means any key (or none)."""
    for prefix in KEYED_PREFIXES:
        if channel.startswith(prefix):
            rest = channel[len(prefix) :]
            return prefix.rstrip("."), (None if rest in (">", "*") else rest)
    if "*" in channel or ">" in channel:
        raise ValueError(f"wildcards are only supported after a keyed prefix on Kafka: {channel!r}")
    return channel, None


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a trailing `>` is one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)
