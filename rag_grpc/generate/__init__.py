"""Answer generation: the Generator interface, the extractive generator and
the retrieve-then-generate pipeline behind RagService.Ask."""
