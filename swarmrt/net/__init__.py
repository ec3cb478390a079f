"""Network layer: gRPC stage service, tensor wire format, DHT records, averaging."""
