"""Topic names and topic filters (§4.7): validation and matching one name against one filter."""

from __future__ import annotations

SHARED_PREFIX = "$share/"


def is_valid_topic_name(topic: str) -> bool:
    """A name to publish to: at least one character, no wildcards (U+0000 is rejected earlier)."""
    return bool(topic) and "+" not in topic and "#" not in topic and len(topic) <= 65535


def is_valid_filter(topic_filter: str) -> bool:
    """`+` must fill a whole level; `#` must fill the last level."""
    if not topic_filter:
        return False
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def is_shared_filter(topic_filter: str) -> bool:
    return topic_filter.startswith(SHARED_PREFIX)


def filter_matches(topic_filter: str, topic: str) -> bool:
    """The reference matcher (the routing trees implement the same rules level by level)."""
    # §4.7.2: a wildcard in the first level never matches a topic starting with `$`.
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True  # also matches the parent level: `a/#` matches `a`
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)
