"""EC2's own wire protocol for the daemon's actions: the Query protocol
(form-encoded requests, XML answers) with SigV4 signatures, so that the AWS
CLI and SDKs manage sgctl unchanged (``sgctl daemon --ec2-endpoint``).

``wire`` turns requests into the JSON API's parameters and results into
EC2's XML, both derived from EC2's service model as botocore ships it;
``sigv4`` checks signatures; ``server`` is the HTTP(S) endpoint."""
