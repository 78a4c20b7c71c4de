"""A gRPC client written by others (Python's grpcio) calling a Tern agent.

tests/grpc_clients.rs runs it. It knows nothing of Tern's protos: the
Console service's messages come from the agent's server reflection.

    tern_client.py [--tls DIR] ADDR health [SERVICE]
    tern_client.py [--tls DIR] ADDR services
    tern_client.py [--tls DIR] ADDR describe METHOD      # tern.v1.Console.Watch
    tern_client.py [--tls DIR] ADDR watch                # events as JSON lines

With --tls, DIR holds ca.pem, cert.pem and key.pem (a `tern ca issue` folder).
Every answer is one line on stdout; a gRPC error prints `error CODE: detail`
and exits 1.
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def channel(address, tls):
    if tls is None:
        return grpc.insecure_channel(address)
    read = lambda name: open(f"{tls}/{name}", "rb").read()
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca.pem"),
        private_key=read("key.pem"),
        certificate_chain=read("cert.pem"),
    )
    return grpc.secure_channel(address, credentials)


def say(line):
    print(line, flush=True)


def main(argv):
    tls = None
    if argv[:1] == ["--tls"]:
        tls, argv = argv[1], argv[2:]
    address, command, args = argv[0], argv[1], argv[2:]
    with channel(address, tls) as chan:
        try:
            run(chan, command, args)
        except grpc.RpcError as e:
            say(f"error {e.code().name}: {e.details()}")
            return 1
    return 0


def run(chan, command, args):
    if command == "health":
        stub = health_pb2_grpc.HealthStub(chan)
        reply = stub.Check(
            health_pb2.HealthCheckRequest(service=args[0] if args else ""), timeout=5
        )
        say(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    elif command == "services":
        stub = reflection_pb2_grpc.ServerReflectionStub(chan)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
            if reply.HasField("error_response"):
                say(f"error {reply.error_response.error_message}")
                return
            say(" ".join(s.name for s in reply.list_services_response.service))
    elif command == "describe":
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(chan))
        service, method = args[0].rsplit(".", 1)
        found = pool.FindServiceByName(service).FindMethodByName(method)
        say(
            json.dumps(
                {
                    "method": found.full_name,
                    "input": found.input_type.full_name,
                    "output": found.output_type.full_name,
                    "server_streaming": found.server_streaming,
                }
            )
        )
    elif command == "watch":
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(chan))
        watch = pool.FindServiceByName("tern.v1.Console").FindMethodByName("Watch")
        request = message_factory.GetMessageClass(watch.input_type)
        reply = message_factory.GetMessageClass(watch.output_type)
        call = chan.unary_stream(
            "/tern.v1.Console/Watch",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=reply.FromString,
        )
        for event in call(request()):
            say(json.dumps(json_format.MessageToDict(event)))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
