"""User id -> table row map. Rows are handed out in order and never reused; unknown users have no row.

Example::

    users = UserIndex(["u1", "u2"])
    users.row("u2")      # 1
    users.row("new")     # None -> cold start
    users.add("new")     # 2
"""

from __future__ import annotations

from collections.abc import Iterable


class UserIndex:
    def __init__(self, ids: Iterable[str] = ()) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}
        for u in ids:
            self.add(u)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, user: str) -> int:
        if user in self.index:
            return self.index[user]
        self.index[user] = len(self.ids)
        self.ids.append(user)
        return self.index[user]

    def row(self, user: str) -> int | None:
        return self.index.get(user)
