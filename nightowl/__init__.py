"""nightowl: personalized, continually learning sentiment analysis.

One import namespace. Its parts, top to bottom (imports only run downward; pyproject's
import-linter contracts enforce it): entry points (`nightowl.cli`, `nightowl.api`), the
scheduler, the day logger (`nightowl.day`) and the night (`nightowl.continual`), composition
(`nightowl.runtime`), the model and its registry (`nightowl.adapters`) and rationale providers
(`nightowl.rationales`), the store and replay memory (`nightowl.memory`), and the foundation
(settings, schemas, auth, errors, io). The design card's folders `continual/`, `memory/`,
`adapters/` and `scheduler/` sit at the top of the repository and install as
`nightowl.continual`, `nightowl.memory`, ... (pyproject's package-dir).
"""

__version__ = "0.1.0"
