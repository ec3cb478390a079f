"""Generated from proto/swarmrt.proto by swarmrt.wire.protogen; do not edit."""
