#!/usr/bin/python3
"""An RTSP server for the tests (gst-rtsp-server through PyGObject, Debian's python3-gi and
gir1.2-gst-rtsp-server-1.0): each mount streams one PNG as H.264 over RTP, looped, as an IP
camera would. Prints "ready" once it listens.

    tests/rtsp-server.py PORT NAME=FRAME.png [NAME=FRAME.png ...] [--auth USER:PASSWORD]
"""
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main():
    args = sys.argv[1:]
    auth = None
    if "--auth" in args:
        i = args.index("--auth")
        auth = args[i + 1].split(":", 1)
        del args[i : i + 2]
    port, mounts = args[0], args[1:]
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    if auth:
        rtsp_auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", "inspector")
        rtsp_auth.add_basic(GstRtspServer.RTSPAuth.make_basic(*auth), token)
        server.set_auth(rtsp_auth)
    for mount in mounts:
        name, frame = mount.split("=", 1)
        factory = GstRtspServer.RTSPMediaFactory()
        # Near-lossless luma (quantiser 4): the pasted defect survives the codec.
        factory.set_launch(
            f'( multifilesrc location="{frame}" loop=true caps=image/png,framerate=4/1 ! pngdec'
            " ! videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency speed-preset=ultrafast"
            " pass=quant quantizer=4 key-int-max=4 ! rtph264pay name=pay0 pt=96 config-interval=1 )"
        )
        factory.set_shared(True)
        if auth:
            permissions = GstRtspServer.RTSPPermissions()
            role = Gst.Structure.from_string(
                "inspector, media.factory.access=(boolean)true, media.factory.construct=(boolean)true"
            )[0]
            permissions.add_role_from_structure(role)
            factory.set_permissions(permissions)
        server.get_mount_points().add_factory("/" + name, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
