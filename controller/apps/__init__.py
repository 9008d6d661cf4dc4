"""The control plane's os-ken apps: thin shells over the decision classes of ``controller/``.

One ``OSKenApp`` per element (docs/controller.md), loaded by ``controller.launcher``:

| module | app | decisions |
|---|---|---|
| ``sdn_controller`` | ``SDNControllerApp``: discovery over RESTCONF, topology DB, notifications, configuration pushes | ``controller.topology`` |
| ``access_control`` | ``AccessControlApp``: op ``authenticate`` | ``controller.access`` |
| ``admission_control`` | ``AdmissionControlApp``: ops ``open`` / ``key_request`` / ``close``, sessions | ``controller.admission`` |
| ``routing`` | ``RoutingApp``: paths and reservations | ``controller.routing`` |
| ``monitoring`` | ``MonitoringApp``: samples, alarms, Prometheus text | ``controller.monitoring`` |
| ``rest_api`` | ``RestApiApp``: the operator REST API | ``controller.rest`` |

They talk to each other only with the os-ken events of ``controller.apps.events``.
"""
