"""Model selection: cross-validation of candidates, the rules that choose among them, and why."""
