"""nightowl: personalized, continually learning sentiment analysis.

This thin package holds the day side's surface: settings, the interaction logger service,
the HTTP API and the CLI. The model lives in `adapters/`, the store and replay memory in
`memory/`, the nightly update in `continual/` and its scheduling in `scheduler/`.
"""

__version__ = "0.1.0"
