"""Channel names, and how Kafka maps a channel with a trailing id onto a topic and a message key."""

from __future__ import annotations

KEYED_PREFIXES = ("forseti.jobs.", "forseti.env.", "forseti.infer.", "forseti.privacy.receipts.")
"""Channels whose last part is an id: on Kafka the prefix is the topic and the id is the key."""

TASKS_PREFIX = "forseti.tasks."
"""Task channels, which every transport stores durably."""


RECORDED_CHANNELS = ("forseti.models",)
"""Broadcast channels whose history the bus keeps (a JetStream stream, a one-partition Kafka topic),
so a durable follower that was away catches up on what it missed, in order."""


def is_recorded_channel(channel: str) -> bool:
    """True for a channel that `Bus.follow` can follow."""
    return channel in RECORDED_CHANNELS


def check_recorded(channel: str) -> None:
    """Refuse to follow a channel whose history is not kept."""
    if not is_recorded_channel(channel):
        raise ValueError(f"{channel!r} keeps no history to follow; recorded: {', '.join(RECORDED_CHANNELS)}")


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
