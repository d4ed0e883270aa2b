"""The day side: the interaction logger (posts and feedback in, the user's own model's answer out)
and the background worker that fills in rationales off the request path."""
