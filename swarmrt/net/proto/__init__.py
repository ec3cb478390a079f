"""Generated from proto/swarmrt.proto by swarmrt.net.protogen; do not edit."""
