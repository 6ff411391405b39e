# EFS for the control plane's data_dir (/data): the generated MQTT CA and server certificate
# must survive task replacement, or every device would distrust the new server.

resource "aws_efs_file_system" "data" {
  creation_token   = "${local.name}-data"
  encrypted        = true
  performance_mode = "generalPurpose"

  tags = {
    Name = "${local.name}-data"
  }
}

resource "aws_efs_backup_policy" "data" {
  file_system_id = aws_efs_file_system.data.id

  backup_policy {
    status = "ENABLED"
  }
}

resource "aws_efs_mount_target" "data" {
  count = 2

  file_system_id  = aws_efs_file_system.data.id
  subnet_id       = aws_subnet.private[count.index].id
  security_groups = [aws_security_group.efs.id]
}

# The image's non-root user (uid/gid 10001) owns the directory.
resource "aws_efs_access_point" "data" {
  file_system_id = aws_efs_file_system.data.id

  posix_user {
    uid = 10001
    gid = 10001
  }

  root_directory {
    path = "/companion"

    creation_info {
      owner_uid   = 10001
      owner_gid   = 10001
      permissions = "0700"
    }
  }
}
