"""Local swarms and fault injection, for users' tests and ours."""
