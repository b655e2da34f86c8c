"""A Reporter that records progress calls and can ask for cancellation after N of them."""

from service.progress import Reporter


class Recorder(Reporter):
    def __init__(self, cancel_after: int | None = None):
        self.calls: list[dict] = []
        self.cancel_after = cancel_after

    def progress(self, **fields):
        self.calls.append(fields)

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.calls) >= self.cancel_after
