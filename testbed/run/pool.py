"""The clients of a run that take part in a round: members (who left, who joined) and selection.

Membership is the controller's: `absent` holds the clients that are out (testbed.scenario's
add_client / remove_client reactions change it between rounds). With client selection
(nodes.selection) the round's participants are the chosen clients that are not absent; they
go to the nodes in the round command as `clients`, and every node narrows its client list to
them, so a server's barrier and averaging cover members only. Nothing here sends a message.
"""

from __future__ import annotations

from typing import Any

from nodes.selection import Selector


class ClientPool:
    def __init__(self, selection: dict[str, Any], seed: int) -> None:
        self.selection, self.seed = selection, seed
        self.selector: Selector | None = None
        self.absent: set[str] = set()

    def choose(self, clients: list[str], samples: dict[str, int]
               ) -> tuple[list[str] | None, dict[str, Any]]:
        """The round's clients (None: all of them, the nodes' default) and the selection's
        record for the round (empty without selection)."""
        choice: dict[str, Any] = {}
        if self.selection:
            if self.selector is None:
                self.selector = Selector(self.selection, clients, samples, self.seed)
            _, choice = self.selector.choose()
        chosen = choice.get("chosen")
        if chosen is None and not self.absent:
            return None, choice
        return [c for c in (chosen if chosen is not None else clients)
                if c not in self.absent], choice

    def observe(self, reports: dict[str, Any]) -> None:
        if self.selector is not None:
            self.selector.observe(reports)
