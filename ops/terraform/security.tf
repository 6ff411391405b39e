# Security groups: the internet reaches only the load balancer, on 443 and 8883; the service
# accepts only the load balancer; the database and the file system accept only the service.

resource "aws_security_group" "lb" {
  name        = "${local.name}-lb"
  description = "Companion load balancer: HTTPS API and MQTT over TLS"
  vpc_id      = aws_vpc.main.id
}

resource "aws_vpc_security_group_ingress_rule" "lb_https" {
  for_each = toset(var.allowed_cidrs)

  security_group_id = aws_security_group.lb.id
  description       = "HTTPS REST API"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_ingress_rule" "lb_mqtts" {
  for_each = toset(var.allowed_cidrs)

  security_group_id = aws_security_group.lb.id
  description       = "MQTT over TLS from devices"
  cidr_ipv4         = each.value
  ip_protocol       = "tcp"
  from_port         = 8883
  to_port           = 8883
}

resource "aws_vpc_security_group_egress_rule" "lb_to_service" {
  for_each = toset(["8000", "8883"])

  security_group_id            = aws_security_group.lb.id
  description                  = "To the service"
  referenced_security_group_id = aws_security_group.service.id
  ip_protocol                  = "tcp"
  from_port                    = tonumber(each.value)
  to_port                      = tonumber(each.value)
}

resource "aws_security_group" "service" {
  name        = "${local.name}-service"
  description = "Companion control plane tasks"
  vpc_id      = aws_vpc.main.id
}

resource "aws_vpc_security_group_ingress_rule" "service_from_lb" {
  for_each = toset(["8000", "8883"])

  security_group_id            = aws_security_group.service.id
  description                  = "From the load balancer"
  referenced_security_group_id = aws_security_group.lb.id
  ip_protocol                  = "tcp"
  from_port                    = tonumber(each.value)
  to_port                      = tonumber(each.value)
}

resource "aws_vpc_security_group_egress_rule" "service_https" {
  security_group_id = aws_security_group.service.id
  description       = "Image pulls, Secrets Manager, LLM and speech APIs"
  cidr_ipv4         = "0.0.0.0/0"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
}

resource "aws_vpc_security_group_egress_rule" "service_db" {
  security_group_id            = aws_security_group.service.id
  description                  = "PostgreSQL"
  referenced_security_group_id = aws_security_group.db.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_vpc_security_group_egress_rule" "service_efs" {
  security_group_id            = aws_security_group.service.id
  description                  = "EFS (TLS material and generated secrets in /data)"
  referenced_security_group_id = aws_security_group.efs.id
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
}

resource "aws_security_group" "db" {
  name        = "${local.name}-db"
  description = "Companion PostgreSQL"
  vpc_id      = aws_vpc.main.id
}

resource "aws_vpc_security_group_ingress_rule" "db_from_service" {
  security_group_id            = aws_security_group.db.id
  description                  = "From the service only"
  referenced_security_group_id = aws_security_group.service.id
  ip_protocol                  = "tcp"
  from_port                    = 5432
  to_port                      = 5432
}

resource "aws_security_group" "efs" {
  name        = "${local.name}-efs"
  description = "Companion data volume"
  vpc_id      = aws_vpc.main.id
}

resource "aws_vpc_security_group_ingress_rule" "efs_from_service" {
  security_group_id            = aws_security_group.efs.id
  description                  = "NFS from the service only"
  referenced_security_group_id = aws_security_group.service.id
  ip_protocol                  = "tcp"
  from_port                    = 2049
  to_port                      = 2049
}
