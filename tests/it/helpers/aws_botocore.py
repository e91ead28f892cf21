"""moat's aws recipe against botocore itself (run by tests/it/recipes.rs).

    python3 aws_botocore.py CERT KEY PROXY MOAT_CA REAL_KEY_ID REAL_SECRET

Starts an S3 and STS stand-in on 127.0.0.1 (HTTPS with CERT/KEY) that accepts a request only
when botocore's own SigV4 code, given the real secret, computes the signature the request
carries; aws-chunked bodies must decode and match their CRC32 trailer. Then makes requests
with botocore and dummy credentials ("moat"/"moat") through moat at PROXY, trusting MOAT_CA:
a single PUT, the trailer-checksum upload current SDKs send, GETs of both, a presigned GET,
and STS GetCallerIdentity. Prints one line per step; exits 1 on the first failure.
"""

import base64
import hashlib
import re
import ssl
import sys
import threading
import urllib.request
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import botocore.session
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

CERT, KEY, PROXY, MOAT_CA, REAL_ID, REAL_SECRET = sys.argv[1:7]
REGION = "eu-west-1"
OBJECTS = {}
SEEN = []

AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([a-z0-9;-]+), Signature=([0-9a-f]{64})$"
)


def decode_aws_chunked(body):
    """The data of an aws-chunked body, and its trailers."""
    data, rest, trailers = b"", body, {}
    while True:
        size_line, rest = rest.split(b"\r\n", 1)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        data, rest = data + rest[:size], rest[size + 2 :]
    for line in rest.split(b"\r\n"):
        if line:
            name, value = line.decode().split(":", 1)
            trailers[name.strip().lower()] = value.strip()
    return data, trailers


def verify(method, path, headers, body):
    """Why the request is refused, or None; and the object data it carries."""
    m = AUTH.match(headers.get("authorization", ""))
    if not m:
        return "no header-form SigV4 Authorization: %r" % headers.get("authorization"), None
    key_id, _date, region, service, signed, signature = m.groups()
    if key_id != REAL_ID:
        return "signed with key id %r, not the real one" % key_id, None
    if "x-amz-signature" in path.lower():
        return "the query still carries a presigned signature", None
    names = signed.split(";")
    request = AWSRequest(
        method=method, url="https://" + headers["host"] + path, headers={n: headers[n] for n in names}, data=b""
    )
    request.context["timestamp"] = headers["x-amz-date"]
    creds = Credentials(REAL_ID, REAL_SECRET, headers.get("x-amz-security-token"))
    signer = (S3SigV4Auth if service == "s3" else SigV4Auth)(creds, service, region)
    declared = headers.get("x-amz-content-sha256")
    payload = declared if declared else hashlib.sha256(body).hexdigest()
    signer.payload = lambda _request: payload
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if expected != signature:
        return "signature does not verify with the real secret", None
    data = body
    if declared == "STREAMING-UNSIGNED-PAYLOAD-TRAILER":
        data, trailers = decode_aws_chunked(body)
        if int(headers["x-amz-decoded-content-length"]) != len(data):
            return "decoded length does not match", None
        crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
        if trailers.get("x-amz-checksum-crc32") != crc:
            return "CRC32 trailer does not match the data: %r" % trailers, None
    elif declared and declared != "UNSIGNED-PAYLOAD" and declared != hashlib.sha256(body).hexdigest():
        return "body does not match x-amz-content-sha256", None
    return None, data


class StandIn(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, body, content_type="application/xml"):
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def read_body(self):
        """The body as framed by HTTP: Content-Length, or chunked transfer coding (which
        botocore uses for aws-chunked uploads, and moat passes on as it came)."""
        if self.headers.get("transfer-encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("content-length") or 0))
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0], 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b""):
                    pass
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    def handle_any(self):
        body = self.read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        SEEN.append((self.command, self.path, headers.get("x-amz-content-sha256")))
        why, data = verify(self.command, self.path, headers, body)
        if why:
            return self.answer(403, ("<Error><Code>SignatureDoesNotMatch</Code><Message>%s</Message></Error>" % why).encode())
        if headers["host"].startswith("sts."):
            return self.answer(200, b"<GetCallerIdentityResponse><GetCallerIdentityResult><Arn>arn:aws:iam::123456789012:user/real</Arn>"
                               b"<UserId>AIDA</UserId><Account>123456789012</Account></GetCallerIdentityResult></GetCallerIdentityResponse>")
        key = self.path.split("?")[0]
        if self.command == "PUT":
            OBJECTS[key] = data
            return self.answer(200, b"")
        if key in OBJECTS:
            return self.answer(200, OBJECTS[key], "application/octet-stream")
        return self.answer(404, b"<Error><Code>NoSuchKey</Code></Error>")

    do_GET = do_PUT = do_POST = do_HEAD = handle_any


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(CERT, KEY)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]

    session = botocore.session.get_session()

    def client(service, **config):
        return session.create_client(
            service,
            region_name=REGION,
            endpoint_url="https://%s.%s.amazonaws.com:%d" % (service, REGION, port),
            aws_access_key_id="moat",
            aws_secret_access_key="moat",
            verify=MOAT_CA,
            config=Config(proxies={"https": PROXY}, s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config),
        )

    def step(name, fn):
        try:
            detail = fn()
            print("ok %s: %s" % (name, detail))
        except Exception as e:  # one line, then stop
            print("FAIL %s: %s" % (name, str(e).splitlines()[0] if str(e) else type(e).__name__))
            sys.exit(1)

    plain = client("s3", request_checksum_calculation="when_required")
    current = client("s3")
    step("single PUT", lambda: (plain.put_object(Bucket="bucket", Key="single.txt", Body=b"single put body"), SEEN[-1][2])[1])
    step("trailer-checksum upload", lambda: (current.put_object(Bucket="bucket", Key="trailer.txt", Body=b"x" * 70000), SEEN[-1][2])[1])
    step("GET single", lambda: plain.get_object(Bucket="bucket", Key="single.txt")["Body"].read().decode())
    step("GET trailer", lambda: len(current.get_object(Bucket="bucket", Key="trailer.txt")["Body"].read()))
    url = plain.generate_presigned_url("get_object", Params={"Bucket": "bucket", "Key": "single.txt"}, ExpiresIn=300)
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"https": PROXY}),
        urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=MOAT_CA)),
    )
    step("presigned GET", lambda: opener.open(url, timeout=20).read().decode())
    step("STS GetCallerIdentity", lambda: client("sts").get_caller_identity()["Arn"])


main()
