"""Yikatong: card transaction and state server. Domain rules live in this package;
`yikatong.v1` holds the protobuf/gRPC modules the build generates from proto/."""
