# A network load balancer in the public subnets: 443 (TLS terminated with the ACM certificate,
# forwarded to the REST API on 8000) and 8883 (TCP passthrough: the broker edge terminates MQTT
# TLS itself with the certificate in /data/tls, which devices pin through their CA file).

resource "aws_lb" "main" {
  name                             = local.name
  load_balancer_type               = "network"
  internal                         = false
  subnets                          = aws_subnet.public[*].id
  security_groups                  = [aws_security_group.lb.id]
  enable_cross_zone_load_balancing = true
}

resource "aws_lb_target_group" "api" {
  name        = "${local.name}-api"
  port        = 8000
  protocol    = "TCP"
  target_type = "ip"
  vpc_id      = aws_vpc.main.id

  health_check {
    protocol            = "HTTP"
    port                = "traffic-port"
    path                = "/ready"
    healthy_threshold   = 2
    unhealthy_threshold = 3
    interval            = 15
  }
}

resource "aws_lb_target_group" "mqtts" {
  name        = "${local.name}-mqtts"
  port        = 8883
  protocol    = "TCP"
  target_type = "ip"
  vpc_id      = aws_vpc.main.id

  # Long-lived device connections: give them time to move on a deploy.
  deregistration_delay = 30

  health_check {
    protocol            = "HTTP"
    port                = "8000"
    path                = "/ready"
    healthy_threshold   = 2
    unhealthy_threshold = 3
    interval            = 15
  }
}

resource "aws_lb_listener" "https" {
  load_balancer_arn = aws_lb.main.arn
  port              = 443
  protocol          = "TLS"
  certificate_arn   = var.api_certificate_arn
  ssl_policy        = "ELBSecurityPolicy-TLS13-1-2-2021-06"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.api.arn
  }
}

resource "aws_lb_listener" "mqtts" {
  load_balancer_arn = aws_lb.main.arn
  port              = 8883
  protocol          = "TCP"

  default_action {
    type             = "forward"
    target_group_arn = aws_lb_target_group.mqtts.arn
  }
}
