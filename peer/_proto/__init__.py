"""Generated from proto/peer.proto by `make proto`; never edit."""
