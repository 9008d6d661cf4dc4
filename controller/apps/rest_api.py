"""The operator REST API as an os-ken app: ``controller.rest`` on the project's HTTPS stack.

``create_rest_app(DbRestBackend(...), TokenAuth(...))`` is served by
``qkdsdn.httpserver.HTTPServer`` (mutual TLS with the controller certificate, or plain HTTP on
loopback with ``--insecure-dev``); a hub thread owns the server's lifetime. The backend reads
and writes the database itself; what needs the running apps goes through os-ken requests from
the server's worker threads:

- ``terminate(ksid)``: ``TerminateRequest`` to admission control;
- ``metrics()``: ``LoadRequest`` to routing, then ``MetricsRequest`` to monitoring;
- ``health()``: ``HealthRequest`` to every app (an app that does not answer is down) and the bus;
- ``on_profiles_changed()``: ``EventProfilesChanged`` to access and admission control.
"""
from __future__ import annotations

from typing import Any

from controller.apps.base import (ACCESS_CONTROL, ADMISSION_CONTROL, MONITORING, ROUTING, SDN_CONTROLLER,
                                  ControllerApp)
from controller.apps.events import EventProfilesChanged, HealthRequest, LoadRequest, MetricsRequest, \
    TerminateRequest

HEALTH_TIMEOUT_S = 2.0
APPS = (SDN_CONTROLLER, ACCESS_CONTROL, ADMISSION_CONTROL, ROUTING, MONITORING)


class RestApiApp(ControllerApp):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from controller.rest import DbRestBackend, TokenAuth, create_rest_app
        from qkdsdn.httpserver import HTTPServer

        settings = self.ctx.rest
        if settings is None:
            raise RuntimeError("RestApiApp needs the REST settings (host, port, TLS)")
        auth = TokenAuth.from_file(settings.tokens_file) if settings.tokens_file else TokenAuth()
        backend = DbRestBackend(self.ctx.session_factory, terminate=self.terminate, metrics=self.metrics,
                                health=self.components_health, on_profiles_changed=self.profiles_changed)
        self.server = HTTPServer(create_rest_app(backend, auth), settings.host, settings.port, tls=settings.tls,
                                 insecure_dev=settings.insecure_dev, name="controller REST API")

    def on_start(self) -> None:
        self.server.start()  # binds here: a port in use fails the controller's start
        self.spawn("http", self.server.serve_forever)  # returns once stop() ran

    def on_stop(self) -> None:
        self.server.stop()

    # ----------------------------------------------------------------- the backend's callables

    def terminate(self, ksid: str) -> bool:
        ok, _message = self.call(ADMISSION_CONTROL, TerminateRequest(ksid))
        return bool(ok)

    def metrics(self) -> str:
        load = self.call(ROUTING, LoadRequest())
        return self.call(MONITORING, MetricsRequest(load))

    def components_health(self) -> dict[str, Any]:
        report: dict[str, Any] = {}
        for name in APPS:
            try:
                report[name] = {"status": "ok", **self.call(name, HealthRequest(), HEALTH_TIMEOUT_S)}
            except Exception as exc:  # noqa: BLE001 - a component that does not answer is down
                report[name] = {"status": "down", "error": f"{type(exc).__name__}: {exc}"}
        bus = self.ctx.bus
        report["bus"] = {"status": "ok" if bus.connected else "down", "client_id": bus.client_id}
        return report

    def profiles_changed(self) -> None:
        for name in (ACCESS_CONTROL, ADMISSION_CONTROL):
            self.send_event(name, EventProfilesChanged())
