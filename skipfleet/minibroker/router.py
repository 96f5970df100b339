"""Who gets a message: the subscription tree, and the retained messages per topic.

Both are tries with one node per topic level, so matching costs the depth of the topic (times the
wildcard branches), not the number of subscriptions or retained topics: a few thousand devices
each subscribed to `fleet/<id>/cmd/#` match in a handful of dict lookups.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator

from skipfleet.minibroker.message import Message
from skipfleet.minibroker.packets import SubscriptionOptions

Subscriber = Hashable


class _FilterNode:
    __slots__ = ("children", "subscribers")

    def __init__(self) -> None:
        self.children: dict[str, _FilterNode] = {}
        self.subscribers: dict[Subscriber, SubscriptionOptions] = {}


class SubscriptionTree:
    """Topic filters to subscribers; `match(topic)` applies the wildcard rules of §4.7."""

    def __init__(self) -> None:
        self._root = _FilterNode()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def add(self, topic_filter: str, subscriber: Subscriber, options: SubscriptionOptions) -> bool:
        """Subscribe (or replace the options of an existing subscription); True if it is new."""
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _FilterNode())
        is_new = subscriber not in node.subscribers
        node.subscribers[subscriber] = options
        self._count += is_new
        return is_new

    def remove(self, topic_filter: str, subscriber: Subscriber) -> bool:
        path = [self._root]
        levels = topic_filter.split("/")
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return False
            path.append(child)
        if path[-1].subscribers.pop(subscriber, None) is None:
            return False
        self._count -= 1
        self._prune(path, levels)
        return True

    @staticmethod
    def _prune(path: list[_FilterNode], levels: list[str]) -> None:
        # Drop the nodes left empty, deepest first, so unsubscribed device ids do not pile up.
        for depth in range(len(levels), 0, -1):
            node = path[depth]
            if node.children or node.subscribers:
                return
            del path[depth - 1].children[levels[depth - 1]]

    def match(self, topic: str) -> list[tuple[Subscriber, SubscriptionOptions]]:
        levels = topic.split("/")
        # §4.7.2: wildcards in the first level do not match `$SYS/...`-style topics.
        dollar = topic.startswith("$")
        found: list[tuple[Subscriber, SubscriptionOptions]] = []
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wildcards_allowed = not (dollar and depth == 0)
            multi = node.children.get("#") if wildcards_allowed else None
            if multi is not None:
                found.extend(multi.subscribers.items())  # also covers the parent: `a/#` gets `a`
            if depth == len(levels):
                found.extend(node.subscribers.items())
                continue
            exact = node.children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            single = node.children.get("+") if wildcards_allowed else None
            if single is not None:
                stack.append((single, depth + 1))
        return found


class _RetainedNode:
    __slots__ = ("children", "message")

    def __init__(self) -> None:
        self.children: dict[str, _RetainedNode] = {}
        self.message: Message | None = None


class RetainedStore:
    """The last retained message per topic (§3.3.1.3)."""

    def __init__(self) -> None:
        self._root = _RetainedNode()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def store(self, message: Message) -> None:
        """Keep `message` as its topic's retained message; an empty payload deletes it."""
        levels = message.topic.split("/")
        if not message.payload:
            self._delete(levels)
            return
        node = self._root
        for level in levels:
            node = node.children.setdefault(level, _RetainedNode())
        self._count += node.message is None
        node.message = message

    def _delete(self, levels: list[str]) -> None:
        path = [self._root]
        for level in levels:
            child = path[-1].children.get(level)
            if child is None:
                return
            path.append(child)
        if path[-1].message is None:
            return
        path[-1].message = None
        self._count -= 1
        for depth in range(len(levels), 0, -1):
            if path[depth].children or path[depth].message is not None:
                return
            del path[depth - 1].children[levels[depth - 1]]

    def matching(self, topic_filter: str, now: float) -> list[Message]:
        """The retained messages a new subscription to `topic_filter` receives; expired ones are
        deleted on the way."""
        found, expired = [], []
        for message in self._walk(topic_filter.split("/")):
            (expired if message.is_expired(now) else found).append(message)
        for message in expired:
            self._delete(message.topic.split("/"))
        return found

    def _walk(self, levels: list[str]) -> Iterator[Message]:
        stack = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == len(levels):
                if node.message is not None:
                    yield node.message
                continue
            level, first = levels[depth], depth == 0
            if level == "#":
                yield from _subtree(node, skip_dollar=first)
            elif level == "+":
                stack.extend(
                    (child, depth + 1)
                    for name, child in node.children.items()
                    if not (first and name.startswith("$"))
                )
            elif (child := node.children.get(level)) is not None:
                stack.append((child, depth + 1))


def _subtree(node: _RetainedNode, *, skip_dollar: bool) -> Iterator[Message]:
    if node.message is not None:
        yield node.message  # `a/#` also matches `a` itself
    stack = [
        child for name, child in node.children.items() if not (skip_dollar and name.startswith("$"))
    ]
    while stack:
        current = stack.pop()
        if current.message is not None:
            yield current.message
        stack.extend(current.children.values())
